//! S/MIME certificates made at test time, TEST ONLY: a CA (ECDSA P-256, made by rcgen) and
//! recipient certificates whose RSA or EC keys come from `openssl genpkey` (rcgen's ring
//! backend cannot make RSA keys), each signed by rcgen with whatever the test asks for.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};

/// A test CA in a directory of its own.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// What a recipient certificate holds.
pub struct Spec {
    pub email: String,
    /// `rsa:BITS` or `ec:P-256`.
    pub key: &'static str,
    pub ca: bool,
    pub key_usages: Vec<KeyUsagePurpose>,
    pub eku: Vec<ExtendedKeyUsagePurpose>,
    /// Seconds from now: valid from `from`, until `until`.
    pub from: i64,
    pub until: i64,
}

impl Spec {
    /// A good recipient: RSA-3072, keyEncipherment, emailProtection, valid for a year.
    pub fn rsa(email: &str) -> Self {
        Self {
            email: email.into(),
            key: "rsa:3072",
            ca: false,
            key_usages: vec![
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::DigitalSignature,
            ],
            eku: vec![ExtendedKeyUsagePurpose::EmailProtection],
            from: -86_400,
            until: 365 * 86_400,
        }
    }
}

/// A recipient certificate and its private key, as files.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn openssl(args: &[&str]) {
    let out = super::tool("openssl", "openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn validity(from: i64, until: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now + time::Duration::seconds(from),
        now + time::Duration::seconds(until),
    )
}

impl Pki {
    pub fn new(dir: &Path, name: &str) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} test CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(-86_400, 10 * 365 * 86_400);
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, cert.pem()).unwrap();
        Self {
            dir,
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A recipient certificate `NAME.pem` (and its key `NAME.key`) signed by this CA.
    pub fn leaf(&self, name: &str, spec: &Spec) -> Leaf {
        assert_ne!(name, "ca", "ca.pem is the CA's");
        let key = self.dir.join(format!("{name}.key"));
        let public = self.dir.join(format!("{name}.pub"));
        let (algo, opt) = match spec.key.split_once(':') {
            Some(("rsa", bits)) => ("RSA", format!("rsa_keygen_bits:{bits}")),
            Some(("ec", curve)) => ("EC", format!("ec_paramgen_curve:{curve}")),
            _ => panic!("key {}", spec.key),
        };
        let k = key.to_str().unwrap();
        openssl(&["genpkey", "-algorithm", algo, "-pkeyopt", &opt, "-out", k]);
        openssl(&[
            "pkey",
            "-in",
            k,
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        let spki =
            SubjectPublicKeyInfo::from_pem(&std::fs::read_to_string(&public).unwrap()).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::Rfc822Name(spec.email.clone().try_into().unwrap())];
        if spec.ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.eku.clone();
        (params.not_before, params.not_after) = validity(spec.from, spec.until);
        let cert = params.signed_by(&spki, &self.issuer).unwrap();
        let path = self.dir.join(format!("{name}.pem"));
        std::fs::write(&path, cert.pem()).unwrap();
        Leaf { cert: path, key }
    }
}
