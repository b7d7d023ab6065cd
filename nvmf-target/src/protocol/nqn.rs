//! NVMe Qualified Names: validation and the names Keelson uses.

use std::fmt;

/// The well-known NQN of a discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Prefix of every NQN Keelson creates.
pub const KEELSON_PREFIX: &str = "nqn.2026-11.io.keelson:";
/// Longest NQN the spec allows, in bytes.
pub const NQN_MAX_LEN: usize = 223;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NqnError {
    #[error("NQN is empty")]
    Empty,
    #[error("NQN is {0} bytes, longer than 223")]
    TooLong(usize),
    #[error("NQN {0:?} does not start with \"nqn.\"")]
    BadPrefix(String),
    #[error("NQN {0:?} contains whitespace or control characters")]
    BadCharacter(String),
}

/// A validated NQN.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nqn(String);

impl Nqn {
    pub fn parse(s: &str) -> Result<Nqn, NqnError> {
        if s.is_empty() {
            return Err(NqnError::Empty);
        }
        if s.len() > NQN_MAX_LEN {
            return Err(NqnError::TooLong(s.len()));
        }
        if !s.starts_with("nqn.") {
            return Err(NqnError::BadPrefix(s.to_string()));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(NqnError::BadCharacter(s.to_string()));
        }
        Ok(Nqn(s.to_string()))
    }

    pub fn discovery() -> Nqn {
        Nqn(DISCOVERY_NQN.to_string())
    }

    /// `nqn.2026-11.io.keelson:vol-<uuid>`
    pub fn volume(uuid: &uuid::Uuid) -> Nqn {
        Nqn(format!("{KEELSON_PREFIX}vol-{uuid}"))
    }

    /// `nqn.2026-11.io.keelson:replica-<uuid>`
    pub fn replica(uuid: &uuid::Uuid) -> Nqn {
        Nqn(format!("{KEELSON_PREFIX}replica-{uuid}"))
    }

    pub fn is_discovery(&self) -> bool {
        self.0 == DISCOVERY_NQN
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Nqn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nqn({})", self.0)
    }
}

/// Reads a NUL-terminated (or full-width) ASCII field.
pub fn read_cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Writes `s` into `b`, NUL padded, truncated to leave a terminating NUL.
pub fn write_cstr(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len().saturating_sub(1));
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates() {
        assert!(Nqn::parse(DISCOVERY_NQN).unwrap().is_discovery());
        assert_eq!(Nqn::parse(""), Err(NqnError::Empty));
        assert!(matches!(Nqn::parse("iqn.x"), Err(NqnError::BadPrefix(_))));
        assert!(matches!(
            Nqn::parse("nqn.a b"),
            Err(NqnError::BadCharacter(_))
        ));
        assert!(matches!(
            Nqn::parse(&format!("nqn.{}", "x".repeat(220))),
            Err(NqnError::TooLong(224))
        ));
        let u = uuid::Uuid::nil();
        assert_eq!(
            Nqn::volume(&u).as_str(),
            "nqn.2026-11.io.keelson:vol-00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn cstr_round_trip() {
        let mut b = [0xFFu8; 16];
        write_cstr(&mut b, "hello");
        assert_eq!(read_cstr(&b), "hello");
        write_cstr(&mut b, &"x".repeat(40));
        assert_eq!(read_cstr(&b).len(), 15);
    }
}
