//! Socket plumbing shared by the target and the initiator: writing a list of PDU segments with vectored writes,
//! and the TCP congestion control of the NVMe/TCP connections ([`Congestion`], set once per process).

use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::AsFd;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Buf, Bytes};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socket, sockopt};
use tokio::io::AsyncWriteExt;

/// The TCP congestion control of the process's NVMe/TCP connections, target and initiator side alike.
///
/// BBR, the default of some distributions and cloud images, paces each connection to the bandwidth it models: on
/// a storage connection, whose data comes in bursts (a 128 KiB read's data sent at once, then nothing until the
/// disk answers), it holds data back. Measured on the project's two-core VM over loopback (engine and host pinned
/// to a core each, a RAM namespace, three alternating rounds): 128 KiB reads at QD8 26.6-27.2k IOPS with BBR
/// against 32.5-33.6k with CUBIC; 128 KiB writes 37-39k against 35-49k; 4 KiB at QD1 and QD32 the same within the
/// rounds' spread. So `Auto` uses CUBIC where the system's default is BBR, and leaves any other default (DCTCP on a
/// network set up for it, say) as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC where the system's default is BBR; otherwise the system's default.
    Auto,
    /// The system's default (`net.ipv4.tcp_congestion_control`), whatever it is.
    System,
    /// This algorithm (it must be loaded, and allowed by `net.ipv4.tcp_allowed_congestion_control` where the
    /// process lacks CAP_NET_ADMIN).
    Named(String),
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Congestion, String> {
        match s {
            "auto" => Ok(Congestion::Auto),
            "system" => Ok(Congestion::System),
            // The kernel's names: at most 15 bytes (TCP_CA_NAME_MAX less its NUL).
            n if !n.is_empty()
                && n.len() < 16
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                Ok(Congestion::Named(n.to_string()))
            }
            _ => Err(format!(
                "{s:?}: auto, system, or the name of a TCP congestion control algorithm (cubic, reno, ...)"
            )),
        }
    }
}

/// The algorithm each new connection is set to; `None`: the system's default.
static CONGESTION: RwLock<Option<OsString>> = RwLock::new(None);
/// A connection's setting failed once (logged once, not per connection).
static CONGESTION_FAILED: AtomicBool = AtomicBool::new(false);

/// The system's default congestion control, if it can be read.
fn system_default() -> Option<String> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Sets the congestion control of the connections made or accepted from now on, after trying it on a socket of its
/// own: the algorithm chosen (`None`: the system's default), or why it cannot be used. `Auto` falls back to the
/// system's default, with a warning, where CUBIC cannot be set.
pub fn set_congestion(c: &Congestion) -> Result<Option<String>, String> {
    let chosen = match c {
        Congestion::System => None,
        Congestion::Auto => system_default()
            .filter(|d| d == "bbr")
            .map(|_| "cubic".to_string()),
        Congestion::Named(n) => Some(n.clone()),
    };
    if let Some(name) = &chosen {
        let trial = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| format!("a socket to try TCP congestion control {name} on: {e}"))?;
        if let Err(e) = setsockopt(&trial, sockopt::TcpCongestion, &OsString::from(name)) {
            let why = format!(
                "TCP congestion control {name} cannot be set ({e}): not loaded (modprobe tcp_{name}), or not in \
                 net.ipv4.tcp_allowed_congestion_control"
            );
            if *c != Congestion::Auto {
                return Err(why);
            }
            tracing::warn!("{why}; the system's default is kept");
            *CONGESTION.write().unwrap_or_else(|e| e.into_inner()) = None;
            return Ok(None);
        }
    }
    *CONGESTION.write().unwrap_or_else(|e| e.into_inner()) = chosen.clone().map(OsString::from);
    Ok(chosen)
}

/// Sets up a new NVMe/TCP connection's socket: no Nagle delay, and the congestion control [`set_congestion`] chose.
pub fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let chosen = CONGESTION.read().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(name) = chosen
        && let Err(e) = setsockopt(&stream.as_fd(), sockopt::TcpCongestion, &name)
        && !CONGESTION_FAILED.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(algorithm = ?name, error = %e, "setting a connection's TCP congestion control failed; it keeps the system's default");
    }
}

/// Makes the socket's close send a reset and drop what it still holds to send (SO_LINGER 0, as the Linux host sets
/// on its NVMe/TCP sockets), instead of delivering it after a FIN.
pub fn reset_on_close(stream: &tokio::net::TcpStream) {
    let _ = setsockopt(
        &stream.as_fd(),
        sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

/// Most segments handed to one writev.
const MAX_IOV: usize = 64;

/// Writes every segment in order with as few system calls as the socket allows, then clears the list.
pub async fn write_parts<W: AsyncWriteExt + Unpin>(
    wr: &mut W,
    parts: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    parts.retain(|p| !p.is_empty());
    let mut idx = 0;
    while idx < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[idx..]
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let len = parts[idx].len();
            if n >= len {
                n -= len;
                idx += 1;
            } else {
                parts[idx].advance(n);
                n = 0;
            }
        }
    }
    parts.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The congestion control chosen is what new connections get, on both ends; `system` leaves the default.
    #[tokio::test]
    async fn connections_get_the_congestion_control_chosen() {
        assert_eq!("auto".parse(), Ok(Congestion::Auto));
        assert_eq!("system".parse(), Ok(Congestion::System));
        assert_eq!("reno".parse(), Ok(Congestion::Named("reno".into())));
        for bad in ["", "a b", "x/../y", "sixteen-bytes-xx"] {
            assert!(bad.parse::<Congestion>().is_err(), "{bad:?}");
        }
        assert!(set_congestion(&Congestion::Named("no-such-cc".into())).is_err());
        let algorithm = |s: &tokio::net::TcpStream| -> String {
            let v = nix::sys::socket::getsockopt(&s.as_fd(), sockopt::TcpCongestion).unwrap();
            v.to_string_lossy().trim_end_matches('\0').to_string()
        };
        let pair = || async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let (a, _) = l.accept().await.unwrap();
            tune(&c);
            tune(&a);
            (c, a)
        };
        // Reno is built into every kernel, and allowed to all.
        assert_eq!(
            set_congestion(&Congestion::Named("reno".into())),
            Ok(Some("reno".into()))
        );
        let (c, a) = pair().await;
        assert_eq!(
            (algorithm(&c), algorithm(&a)),
            ("reno".into(), "reno".into())
        );
        assert_eq!(set_congestion(&Congestion::System), Ok(None));
        let (c, _a) = pair().await;
        assert_eq!(Some(algorithm(&c)), system_default());
    }

    #[tokio::test]
    async fn writes_everything_in_order() {
        let mut out: Vec<u8> = Vec::new();
        let mut parts: Vec<Bytes> = (0..200u8)
            .map(|i| Bytes::from(vec![i; usize::from(i % 7)]))
            .collect();
        let want: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        write_parts(&mut out, &mut parts).await.unwrap();
        assert_eq!(out, want);
        assert!(parts.is_empty());
    }
}
