//! Child URIs of a nexus: `nvmf://IP:PORT/NQN[?nsid=N]` for a namespace on another node (reached through the
//! initiator) and `local:///NQN[?nsid=N]` for a namespace served by this io-engine (used directly).

use std::net::SocketAddr;

use crate::protocol::nqn::Nqn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildUri {
    Nvmf {
        addr: SocketAddr,
        nqn: Nqn,
        nsid: u32,
    },
    Local {
        nqn: Nqn,
        nsid: u32,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("child URI {uri:?}: {reason}")]
pub struct UriError {
    pub uri: String,
    pub reason: String,
}

impl ChildUri {
    /// The namespace it names, wherever it is reached: NQNs name one subsystem (a replica's is its own), so two URIs
    /// with the same NQN and NSID are the same namespace, whatever their addresses or schemes.
    pub fn namespace(&self) -> (&str, u32) {
        match self {
            ChildUri::Nvmf { nqn, nsid, .. } | ChildUri::Local { nqn, nsid } => {
                (nqn.as_str(), *nsid)
            }
        }
    }

    pub fn parse(uri: &str) -> Result<ChildUri, UriError> {
        let bad = |reason: &str| UriError {
            uri: uri.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad("expected scheme://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let nsid = match query {
            None => 1,
            Some(q) => q
                .strip_prefix("nsid=")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| bad("the only query is nsid=N with N > 0"))?,
        };
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected a /NQN path"))?;
        let nqn = Nqn::parse(path).map_err(|e| bad(&e.to_string()))?;
        match scheme {
            "nvmf" => {
                let addr = host
                    .parse()
                    .map_err(|_| bad("expected IP:PORT after nvmf://"))?;
                Ok(ChildUri::Nvmf { addr, nqn, nsid })
            }
            "local" if host.is_empty() => Ok(ChildUri::Local { nqn, nsid }),
            "local" => Err(bad("local:/// takes no host")),
            _ => Err(bad("scheme must be nvmf or local")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let u = ChildUri::parse("nvmf://127.0.0.2:4420/nqn.2026-11.io.keelson:replica-x?nsid=2")
            .unwrap();
        assert_eq!(
            u,
            ChildUri::Nvmf {
                addr: "127.0.0.2:4420".parse().unwrap(),
                nqn: Nqn::parse("nqn.2026-11.io.keelson:replica-x").unwrap(),
                nsid: 2
            }
        );
        assert!(matches!(
            ChildUri::parse("local:///nqn.a").unwrap(),
            ChildUri::Local { nsid: 1, .. }
        ));
        for bad in [
            "nvmf:/x",
            "nvmf://host/nqn.a",
            "nvmf://1.2.3.4:1/notnqn",
            "ftp://1.2.3.4:1/nqn.a",
            "local://h/nqn.a",
            "local:///nqn.a?nsid=0",
            "local:///nqn.a?x=1",
        ] {
            assert!(ChildUri::parse(bad).is_err(), "{bad}");
        }
    }
}
