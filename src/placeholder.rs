//! Placeholders are not recipients (SPEC §3): the example config encrypts to addresses at
//! example.com, .org and .net, to the EXAMPLE keys shipped under `config/`, and to its own
//! age recipient. A sink that would still deliver to one of them is refused when the sinks
//! are built (`check` online and offline, start, reload, every command that delivers), before
//! any other check of that recipient: codes sent there would be codes nobody can read.
//! There is no switch that allows them; the tests use `.test` domains (RFC 6761).

/// The domains reserved for documentation (RFC 2606), with their subdomains.
const EXAMPLE_DOMAINS: [&str; 3] = ["example.com", "example.org", "example.net"];

/// The age recipient of `config/example.toml` (age's own README key: its identity is
/// public).
pub const EXAMPLE_AGE_RECIPIENT: &str =
    "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// Primary-key fingerprints of the OpenPGP keys shipped under `config/keys/` (marked
/// EXAMPLE). A unit test keeps this list and the files in step.
pub const SHIPPED_PGP_KEYS: [(&str, &str); 1] = [(
    "config/keys/secops.asc",
    "B04E29BE7BF344AF170482CEBB4F95448568AD3B",
)];

/// SHA-256 fingerprints of the DER of the certificates shipped under `config/certs/`
/// (marked EXAMPLE). A unit test keeps this list and the files in step.
pub const SHIPPED_CERTS: [(&str, &str); 2] = [
    (
        "config/certs/ca.pem",
        "ACBE32EBC79F7DA791EBDDE6C2E270C0E054419077A2EAD97E8F4D8CED1E87A4",
    ),
    (
        "config/certs/secops.pem",
        "5A23680D12C86D91ED4A1119262DDCC7837C3284293009B5BC763B96026557D1",
    ),
];

/// The fix, said the same way for every kind of placeholder.
const FIX: &str = "replace the example recipient with your own";

/// Whether `host` is, or is under, a documentation domain.
pub fn is_example_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    EXAMPLE_DOMAINS
        .iter()
        .any(|d| host == *d || host.strip_suffix(d).is_some_and(|s| s.ends_with('.')))
}

/// Why the mail address `addr` is a placeholder, if it is one.
pub fn address(addr: &str) -> Option<String> {
    let (_, domain) = addr.rsplit_once('@')?;
    let domain = domain.trim_end_matches('>');
    is_example_host(domain).then(|| {
        format!("`{addr}` is an example address (a domain reserved for documentation); {FIX}")
    })
}

/// Why the age recipient `r` is a placeholder, if it is one.
pub fn age_recipient(r: &str) -> Option<String> {
    (r.trim() == EXAMPLE_AGE_RECIPIENT).then(|| {
        format!("`{r}` is the example age recipient shipped in config/example.toml (its identity is public); {FIX}")
    })
}

/// The shipped file of `list` with this fingerprint (hex, any case), if there is one.
fn shipped(list: &[(&'static str, &'static str)], fingerprint: &str) -> Option<&'static str> {
    list.iter()
        .find(|(_, f)| f.eq_ignore_ascii_case(fingerprint))
        .map(|(file, _)| *file)
}

/// Why the OpenPGP key of this primary fingerprint (hex, any case) is a placeholder, if it
/// is one.
pub fn pgp_key(fingerprint: &str) -> Option<String> {
    shipped(&SHIPPED_PGP_KEYS, fingerprint).map(|file| {
        let f = fingerprint.to_ascii_uppercase();
        format!("key {f} is the EXAMPLE key shipped with tfa-rotator ({file} in its source); {FIX} (a key whose owner holds its secret part)")
    })
}

/// Why the certificate of this SHA-256 fingerprint (hex, any case) is a placeholder, if it
/// is one.
pub fn certificate(fingerprint: &str) -> Option<String> {
    shipped(&SHIPPED_CERTS, fingerprint).map(|file| {
        format!("it is the EXAMPLE certificate shipped with tfa-rotator ({file} in its source); {FIX} (a certificate whose owner holds its private key)")
    })
}

/// Why the webhook URL `url` is a placeholder, if it is one (its host is an example domain).
pub fn webhook_url(url: &url::Url) -> Option<String> {
    let host = url.host_str()?;
    is_example_host(host)
        .then(|| format!("`{url}` is an example URL (a domain reserved for documentation); {FIX}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documentation_domains_and_their_subdomains_are_examples() {
        for h in [
            "example.com",
            "EXAMPLE.org",
            "mail.example.net",
            "a.b.example.com.",
        ] {
            assert!(is_example_host(h), "{h}");
        }
        for h in [
            "notexample.com",
            "example.company",
            "rotator.test",
            "example",
        ] {
            assert!(!is_example_host(h), "{h}");
        }
        assert!(address("secops@Example.COM").is_some());
        assert!(address("ops@myexample.com").is_none());
    }

    /// The files of `dir` (under the repository) are exactly those `list` names.
    fn lists_every_file(dir: &str, list: &[(&str, &str)]) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| format!("{dir}/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        files.sort();
        let listed: Vec<&str> = list.iter().map(|(f, _)| *f).collect();
        assert_eq!(files, listed);
    }

    /// Every key and certificate shipped under `config/` is listed by its fingerprint, and
    /// the example config's age recipient is the one refused.
    #[test]
    fn the_shipped_placeholders_are_the_ones_recognised() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        lists_every_file("config/keys", &SHIPPED_PGP_KEYS);
        for (file, fpr) in SHIPPED_PGP_KEYS {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let (keys, _) =
                <pgp::composed::SignedPublicKey as pgp::composed::Deserializable>::from_string_many(
                    &text,
                )
                .unwrap();
            let fprs: Vec<String> = keys
                .map(|k| {
                    use pgp::types::KeyDetails;
                    hex::encode(k.unwrap().fingerprint().as_bytes()).to_uppercase()
                })
                .collect();
            assert_eq!(fprs, [fpr], "{file}");
        }
        let example = std::fs::read_to_string(root.join("config/example.toml")).unwrap();
        assert!(example.contains(EXAMPLE_AGE_RECIPIENT));
        lists_every_file("config/certs", &SHIPPED_CERTS);
        for (file, fpr) in SHIPPED_CERTS {
            let pem = std::fs::read_to_string(root.join(file)).unwrap();
            let cert =
                <x509_cert::Certificate as der::DecodePem>::from_pem(pem.as_bytes()).unwrap();
            let der = der::Encode::to_der(&cert).unwrap();
            use sha2::Digest;
            assert_eq!(hex::encode_upper(sha2::Sha256::digest(&der)), fpr, "{file}");
        }
    }
}
