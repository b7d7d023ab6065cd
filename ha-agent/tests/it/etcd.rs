//! A real etcd (Debian package `etcd-server`, installed by scripts/install-deps.sh) started by the test on loopback
//! ports with a temporary data directory, killed when dropped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ha_agent::cluster::store::etcd::EtcdStore;

pub struct Etcd {
    child: Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    e2e::ports::free_port("127.0.0.1")
}

impl Etcd {
    /// Starts etcd, or `None` (after saying why) where it is not installed and the test may skip.
    pub async fn start(test: &str) -> Option<Etcd> {
        if !e2e::privileged::allowed_with(test, &["etcd"]) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "keelson-test", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("keelson-test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian package etcd-server)");
        let e = Etcd {
            child,
            endpoint,
            _dir: dir,
        };
        let t = Instant::now();
        while EtcdStore::connect(std::slice::from_ref(&e.endpoint))
            .await
            .is_err()
        {
            assert!(t.elapsed() < Duration::from_secs(20), "etcd never came up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(e)
    }

    pub async fn store(&self) -> EtcdStore {
        EtcdStore::connect(std::slice::from_ref(&self.endpoint))
            .await
            .unwrap()
    }

    /// Freezes etcd (SIGSTOP) or lets it go on (SIGCONT).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
