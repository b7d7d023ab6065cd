//! Connecting and removing NVMe-oF controllers the way nvme-cli does, through the kernel's plain files: a connect is
//! one line of options written to `/dev/nvme-fabrics` (the answer, `instance=N,cntlid=M`, is read back from it), a
//! removal is `1` written to the controller's `delete_controller`.

use std::io::{Read, Write};
use std::path::Path;

/// A new path to a subsystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub nqn: String,
    /// `ip:port`.
    pub address: String,
    pub host_nqn: String,
    /// The host ID the host's other controllers of the subsystem use (the kernel refuses another for the same
    /// host NQN); empty: the kernel's default.
    pub host_id: String,
    /// Keep-alive timeout, seconds: how soon a silent target is noticed.
    pub keep_alive_tmo: u32,
}

impl Connect {
    /// The option line: I/O waits in the kernel while a path reconnects (`ctrl_loss_tmo=-1`, no
    /// `fast_io_fail_tmo`), so nothing fails during a switch-over; SQ flow control is off (`disable_sqflow`), so an
    /// engine ends each read with its data alone instead of a data PDU and a response.
    pub fn options(&self) -> Result<String, std::io::Error> {
        let (ip, port) = self.address.rsplit_once(':').ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("address {:?} is not ip:port", self.address),
            )
        })?;
        // Each value is one option's: nothing in it may end the option or start another.
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        for (what, v) in [
            ("subsystem NQN", self.nqn.as_str()),
            ("address", ip),
            ("port", port),
            ("host NQN", self.host_nqn.as_str()),
            ("host ID", self.host_id.as_str()),
        ] {
            if v.chars()
                .any(|c| c == ',' || c == '=' || c.is_whitespace() || c.is_control())
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{what} {v:?} cannot go into a connect option"),
                ));
            }
        }
        let mut o = format!(
            "nqn={},transport=tcp,traddr={},trsvcid={port},hostnqn={},ctrl_loss_tmo=-1,keep_alive_tmo={},reconnect_delay=1,disable_sqflow",
            self.nqn, ip, self.host_nqn, self.keep_alive_tmo
        );
        if !self.host_id.is_empty() {
            o.push_str(&format!(",hostid={}", self.host_id));
        }
        Ok(o)
    }
}

/// The controller the kernel made: `nvme<instance>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connected {
    pub instance: u32,
    pub cntlid: u32,
}

/// Parses the kernel's `instance=N,cntlid=M` answer.
pub fn parse_answer(s: &str) -> Option<Connected> {
    let field = |k: &str| {
        s.trim()
            .split(',')
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(Connected {
        instance: field("instance=")?,
        cntlid: field("cntlid=")?,
    })
}

/// Connects through `fabrics` (`/dev/nvme-fabrics`). Blocking: the kernel answers once the controller is live or
/// refused (EINVAL and the reason in dmesg); call it from a blocking thread.
pub fn connect(fabrics: &Path, c: &Connect) -> std::io::Result<Connected> {
    let opts = c.options()?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fabrics)?;
    f.write_all(opts.as_bytes())?;
    let mut answer = String::new();
    f.read_to_string(&mut answer)?;
    parse_answer(&answer).ok_or_else(|| {
        std::io::Error::other(format!("the kernel answered {answer:?} to a connect"))
    })
}

/// Connects `c` with `connect`, trying again (up to `tries` times in all) only while the kernel refuses it as a clash
/// of controller IDs (EINVAL: it still holds, for the dead controller, the ID the target handed out; the target hands
/// out the next one to the next connect). Any other failure is answered at once: an address the host cannot reach
/// costs the kernel's one SYN retry, about 3 s, and the volume's I/O waits while it is tried again.
pub fn connect_retrying(
    tries: u32,
    c: &Connect,
    mut connect: impl FnMut(&Connect) -> std::io::Result<Connected>,
) -> std::io::Result<Connected> {
    let mut attempt = 1;
    loop {
        match connect(c) {
            Err(e) if e.raw_os_error() == Some(EINVAL) && attempt < tries => {
                tracing::warn!(nqn = %c.nqn, address = %c.address, error = %e, attempt, "connect refused: trying again");
                std::thread::sleep(std::time::Duration::from_millis(100));
                attempt += 1;
            }
            r => return r,
        }
    }
}

const EINVAL: i32 = 22;

/// Resets controller `name` (`nvme3`) under `sys` (`/sys`): the kernel tears its queues down, so the I/O it held
/// goes to the subsystem's other paths, and then tries to reconnect it.
pub fn reset(sys: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::write(
        sys.join("class/nvme").join(name).join("reset_controller"),
        b"1",
    ) {
        // The queues were torn down (what the reset is for) but reconnecting failed: the target is still silent.
        Err(e) if e.raw_os_error() == Some(ENETRESET) => Ok(()),
        r => r,
    }
}

/// What the kernel answers a reset whose controller did not come back live.
const ENETRESET: i32 = 102;

/// Removes controller `name` (`nvme3`) under `sys` (`/sys`).
pub fn delete(sys: &Path, name: &str) -> std::io::Result<()> {
    std::fs::write(
        sys.join("class/nvme").join(name).join("delete_controller"),
        b"1",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a controller-ID clash (EINVAL) is tried again; an unreachable address is given up at once, so the
    /// next address is tried. Before, every failure was tried five times (about 15 s for an unreachable one).
    #[test]
    fn only_a_refused_controller_id_is_tried_again() {
        let c = Connect {
            nqn: "nqn.2026-11.io.keelson:vol-x".into(),
            address: "10.0.0.1:4420".into(),
            host_nqn: "nqn.2026-11.io.keelson:host-a".into(),
            host_id: String::new(),
            keep_alive_tmo: 5,
        };
        let mut calls = 0;
        let r = connect_retrying(5, &c, |_| {
            calls += 1;
            Err(std::io::Error::from_raw_os_error(110))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1, "an unreachable address was tried again");
        let mut calls = 0;
        let r = connect_retrying(5, &c, |_| {
            calls += 1;
            if calls < 3 {
                Err(std::io::Error::from_raw_os_error(EINVAL))
            } else {
                Ok(Connected {
                    instance: 4,
                    cntlid: 9,
                })
            }
        });
        assert_eq!(r.unwrap().instance, 4);
        assert_eq!(calls, 3);
    }

    #[test]
    fn the_option_line_keeps_io_waiting_and_carries_the_host_identity() {
        let c = Connect {
            nqn: "nqn.2026-11.io.keelson:vol-x".into(),
            address: "10.200.0.1:4421".into(),
            host_nqn: "nqn.2014-08.org.nvmexpress:uuid:h".into(),
            host_id: "0f1e2d3c-0000-4000-8000-000000000001".into(),
            keep_alive_tmo: 5,
        };
        assert_eq!(
            c.options().unwrap(),
            "nqn=nqn.2026-11.io.keelson:vol-x,transport=tcp,traddr=10.200.0.1,trsvcid=4421,\
             hostnqn=nqn.2014-08.org.nvmexpress:uuid:h,ctrl_loss_tmo=-1,keep_alive_tmo=5,reconnect_delay=1,\
             disable_sqflow,hostid=0f1e2d3c-0000-4000-8000-000000000001"
        );
        let bad = Connect {
            address: "nowhere".into(),
            ..c
        };
        assert!(bad.options().is_err());
    }

    #[test]
    fn a_value_cannot_add_an_option() {
        let good = Connect {
            nqn: "nqn.2026-11.io.keelson:vol-x".into(),
            address: "127.0.0.1:4420".into(),
            host_nqn: "nqn.2026-11.io.keelson:host-a".into(),
            host_id: String::new(),
            keep_alive_tmo: 2,
        };
        assert!(good.options().is_ok());
        for bad in [
            Connect {
                host_nqn: "nqn.x,nr_io_queues=1".into(),
                ..good.clone()
            },
            Connect {
                address: "10.0.0.1:4420,hostnqn=nqn.y".into(),
                ..good.clone()
            },
            Connect {
                nqn: "nqn.x hostid=1".into(),
                ..good.clone()
            },
            Connect {
                host_id: "a=b".into(),
                ..good.clone()
            },
        ] {
            let e = bad.options().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn the_kernels_answer() {
        assert_eq!(
            parse_answer("instance=3,cntlid=17\n"),
            Some(Connected {
                instance: 3,
                cntlid: 17
            })
        );
        assert_eq!(parse_answer("instance=3"), None);
        assert_eq!(parse_answer(""), None);
    }
}
