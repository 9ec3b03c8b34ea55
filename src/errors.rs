//! Errors for people: an error and its causes on one line, each cause said once; the
//! process's exit codes.

/// Exit codes (sysexits-style: 78 for a bad config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// Something failed.
    Failed = 1,
    /// Wrong usage.
    Usage = 2,
    /// The configuration is invalid (`EX_CONFIG`).
    Config = 78,
}

/// `error: cause: deeper cause`. Libraries often put their source's text into their own
/// message too (lettre, hyper), so a cause whose text the line already holds is skipped:
/// every cause is said once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(String, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let root = E("550 no such user".into(), None);
        let mid = E(
            "permanent error (550): 550 no such user".into(),
            Some(Box::new(root)),
        );
        let top = E("sending the mail".into(), Some(Box::new(mid)));
        assert_eq!(
            chain(&top),
            "sending the mail: permanent error (550): 550 no such user"
        );
        let plain = E("a".into(), Some(Box::new(E("b".into(), None))));
        assert_eq!(chain(&plain), "a: b");
    }
}
