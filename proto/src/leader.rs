//! The cluster agents of a cluster all answer, one leads: how a follower's refusal reads, so that a client tries the
//! next agent on it and not on the leader's own UNAVAILABLE (a node not Online, an engine not answering), whose
//! reason is the one to report.

/// Metadata a follower's refusal carries.
const NOT_LEADER: &str = "keelson-not-leader";

/// A follower's answer to a call only the leader serves: UNAVAILABLE, marked.
pub fn not_leader() -> tonic::Status {
    let mut s = tonic::Status::unavailable("this cluster agent does not lead (yet); try another");
    s.metadata_mut()
        .insert(NOT_LEADER, tonic::metadata::MetadataValue::from_static("1"));
    s
}

/// Whether `s` is a follower's refusal ([`not_leader`]); an agent from before the mark says so in its message.
pub fn is_not_leader(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable
        && (s.metadata().contains_key(NOT_LEADER) || s.message().contains("does not lead"))
}

/// Whether `s` says the agent was not reached, or did not answer in time (the call's deadline, which the client's
/// own timeout gives as CANCELLED): another agent may serve.
pub fn not_reached(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some()
        || (s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_followers_refusal_is_told_from_the_leaders_own_unavailable() {
        assert!(is_not_leader(&not_leader()));
        assert!(!is_not_leader(&tonic::Status::unavailable(
            "node reg-2 is Offline"
        )));
        assert!(!not_reached(&tonic::Status::unavailable(
            "node reg-2 is Offline"
        )));
    }
}
