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

/// The candidate closest to `word`, if one is close enough to be a likely typo: a
/// Jaro-Winkler similarity of at least 0.8 (as clap's suggestions use), or one edit away
/// (a swapped pair counts as one: `ulr` for `url`).
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            (
                strsim::osa_distance(word, c),
                strsim::jaro_winkler(word, c),
                c,
            )
        })
        .filter(|(edits, score, _)| *score >= 0.8 || (*edits <= 1 && word.len() >= 3))
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(_, _, c)| c)
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

    #[test]
    fn did_you_mean_suggests_a_likely_typo_and_nothing_far() {
        let keys = ["url", "api_key", "schedule", "sinks"];
        assert_eq!(super::did_you_mean("schedul", keys), Some("schedule"));
        assert_eq!(super::did_you_mean("sink", keys), Some("sinks"));
        assert_eq!(super::did_you_mean("colour", keys), None);
        assert_eq!(super::did_you_mean("ulr", keys), Some("url"));
        assert_eq!(super::did_you_mean("x", []), None);
    }
}
