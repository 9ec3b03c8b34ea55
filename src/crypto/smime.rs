//! S/MIME recipients (RFC 8551): X.509 certificates, checked before use, and CMS
//! EnvelopedData (RFC 5652) to them with RustCrypto's `cms` (pure Rust, like the rest).
//!
//! A certificate is used only when it chains to `smime_ca` with verified signatures and is
//! within its validity (rustls-webpki, whose extended-key-usage check accepts
//! emailProtection or no EKU), is not a CA, allows keyEncipherment when it has a keyUsage,
//! names the address as an rfc822Name, and holds an RSA key of at least 2048 bits.
//! Content is AES-256-CBC; the content key goes to each RSA key by PKCS #1 v1.5 key
//! transport, which Outlook and gpgsm 2.2 read (they read neither AES-GCM nor RSA-OAEP).
//!
//! EC certificates are refused: every published `cms` 0.3 pre-release wraps the content
//! key of a key-agreement recipient (ECDH) under an all-zero key instead of the one it
//! derives (measured with `openssl enc -d -id-aes256-wrap` and a zero key), so such a
//! message would be readable by anyone. The KDF and key wrap are not written here.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use cms::builder::{
    ContentEncryptionAlgorithm, EnvelopedDataBuilder, KeyEncryptionInfo,
    KeyTransRecipientInfoBuilder,
};
use cms::cert::IssuerAndSerialNumber;
use cms::content_info::ContentInfo;
use cms::enveloped_data::RecipientIdentifier;
use der::{Decode, DecodePem, Encode};
use sha2::Digest;
use x509_cert::Certificate;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAltName};

/// id-kp-emailProtection, 1.3.6.1.5.5.7.3.4, as DER content bytes.
const EMAIL_PROTECTION: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x04];

/// The smallest RSA modulus accepted (as for OpenPGP).
pub const MIN_RSA_BITS: usize = 2048;

/// A checked recipient certificate, ready to encrypt to.
#[derive(Clone)]
pub struct SmimeCert {
    /// The file it came from.
    pub path: PathBuf,
    /// Its subject, for messages.
    pub subject: String,
    /// The lowercased rfc822Name addresses of its subjectAltName.
    pub emails: Vec<String>,
    /// SHA-256 of its DER, hex (upper case).
    pub fingerprint: String,
    /// Its notAfter.
    pub expires: SystemTime,
    recipient: IssuerAndSerialNumber,
    key: rsa010::RsaPublicKey,
}

impl std::fmt::Debug for SmimeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SmimeCert({} {})", self.subject, self.path.display())
    }
}

/// The PEM certificates of a file, as DER.
fn pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: reading the certificate: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut rest = text.as_str();
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    while let Some(start) = rest.find(BEGIN) {
        let end = rest[start..]
            .find(END)
            .map(|e| start + e + END.len())
            .ok_or_else(|| format!("{}: a PEM certificate has no END line", path.display()))?;
        let cert = Certificate::from_pem(&rest.as_bytes()[start..end])
            .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
        out.push(
            cert.to_der()
                .map_err(|e| format!("{}: {e}", path.display()))?,
        );
        rest = &rest[end..];
    }
    if out.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(out)
}

/// The trust anchors of `smime_ca`.
pub struct Anchors {
    path: PathBuf,
    ders: Vec<Vec<u8>>,
}

impl Anchors {
    /// Reads every certificate of the file.
    pub fn load(path: &Path) -> Result<Self, String> {
        Ok(Self {
            path: path.to_path_buf(),
            ders: pem_certs(path)?,
        })
    }
}

/// Reads every certificate of `path` and checks each against `ca` at `now`.
pub fn load_certs(path: &Path, ca: &Anchors, now: SystemTime) -> Result<Vec<SmimeCert>, String> {
    pem_certs(path)?
        .iter()
        .map(|der| check_cert(path, der, ca, now))
        .collect()
}

fn check_cert(path: &Path, der: &[u8], ca: &Anchors, now: SystemTime) -> Result<SmimeCert, String> {
    let fingerprint = hex::encode_upper(sha2::Sha256::digest(der));
    let cert = Certificate::from_der(der).map_err(|e| format!("{}: {e}", path.display()))?;
    let tbs = cert.tbs_certificate();
    let subject = tbs.subject().to_string();
    let ctx = |m: String| format!("{} ({subject}): {m}", path.display());
    // Before any other check: an EXAMPLE certificate is refused as what it is.
    if let Some(m) = crate::placeholder::certificate(&fingerprint) {
        return Err(ctx(m));
    }
    let spki = tbs.subject_public_key_info();
    let key = match spki.algorithm.oid.to_string().as_str() {
        "1.2.840.113549.1.1.1" => {
            let spki_der = spki.to_der().map_err(|e| ctx(e.to_string()))?;
            <rsa010::RsaPublicKey as rsa010::pkcs8::DecodePublicKey>::from_public_key_der(&spki_der)
                .map_err(|e| ctx(format!("its RSA key does not parse: {e}")))?
        }
        "1.2.840.10045.2.1" => {
            return Err(ctx(
                "EC recipients are not supported yet (no published CMS library encrypts to them correctly); use an RSA certificate".into(),
            ));
        }
        other => return Err(ctx(format!("its key algorithm {other} is not RSA"))),
    };
    let bits = rsa010::traits::PublicKeyParts::size(&key) * 8;
    if bits < MIN_RSA_BITS {
        return Err(ctx(format!(
            "its key is RSA of {bits} bits; at least {MIN_RSA_BITS} are required"
        )));
    }
    let (not_before, not_after) = (
        tbs.validity().not_before.to_system_time(),
        tbs.validity().not_after.to_system_time(),
    );
    if not_after <= now {
        return Err(ctx(format!(
            "the certificate expired on {}",
            super::day(not_after)
        )));
    }
    if now < not_before {
        return Err(ctx(format!(
            "the certificate is valid only from {}",
            super::day(not_before)
        )));
    }
    let ext = |e: der::Error| ctx(format!("an extension does not parse: {e}"));
    if let Some((_, bc)) = tbs.get_extension::<BasicConstraints>().map_err(ext)?
        && bc.ca
    {
        return Err(ctx(
            "it is a CA certificate (basicConstraints CA:TRUE), not a recipient's".into(),
        ));
    }
    if let Some((_, ku)) = tbs.get_extension::<KeyUsage>().map_err(ext)?
        && !ku.key_encipherment()
    {
        return Err(ctx(
            "its keyUsage does not allow keyEncipherment, which RSA key transport needs".into(),
        ));
    }
    if let Some((_, eku)) = tbs.get_extension::<ExtendedKeyUsage>().map_err(ext)?
        && !eku.0.iter().any(|o| o.as_bytes() == EMAIL_PROTECTION)
    {
        return Err(ctx(
            "its extendedKeyUsage does not include emailProtection".into()
        ));
    }
    let emails: Vec<String> = tbs
        .get_extension::<SubjectAltName>()
        .map_err(ext)?
        .map(|(_, san)| {
            san.0
                .iter()
                .filter_map(|n| match n {
                    GeneralName::Rfc822Name(a) => Some(a.to_string().to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    chains_to(der, ca, now).map_err(ctx)?;
    Ok(SmimeCert {
        path: path.to_path_buf(),
        subject,
        emails,
        fingerprint,
        expires: not_after,
        recipient: IssuerAndSerialNumber {
            issuer: tbs.issuer().clone(),
            serial_number: tbs.serial_number().clone(),
        },
        key,
    })
}

/// The chain and its signatures, by rustls-webpki: to one of `ca`'s certificates, each
/// within its validity, emailProtection or no extended key usage.
fn chains_to(der: &[u8], ca: &Anchors, now: SystemTime) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let ders: Vec<CertificateDer<'_>> = ca
        .ders
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{}: a CA certificate is not usable as a trust anchor: {e}",
                ca.path.display()
            )
        })?;
    let leaf = CertificateDer::from(der);
    let ee = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &[],
        UnixTime::since_unix_epoch(since),
        webpki::KeyUsage::required_if_present(EMAIL_PROTECTION),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("it does not chain to smime_ca ({}): {e}", ca.path.display()))
}

/// CMS EnvelopedData of `content` to every certificate at once (one content key), as the
/// DER of its ContentInfo.
pub fn encrypt(certs: &[&SmimeCert], content: &[u8]) -> Result<Vec<u8>, String> {
    let mut builder =
        EnvelopedDataBuilder::new(None, content, ContentEncryptionAlgorithm::Aes256Cbc, None)
            .map_err(|e| format!("CMS: {e}"))?;
    for c in certs {
        let ri = KeyTransRecipientInfoBuilder::new(
            RecipientIdentifier::IssuerAndSerialNumber(c.recipient.clone()),
            KeyEncryptionInfo::Rsa(c.key.clone()),
        )
        .map_err(|e| format!("CMS: {e}"))?;
        builder
            .add_recipient_info(ri)
            .map_err(|e| format!("CMS: {e}"))?;
    }
    let enveloped = builder
        .build_with_rng(&mut rand010::rng())
        .map_err(|e| format!("CMS: {e}"))?;
    let info = ContentInfo {
        content_type: const_oid::db::rfc5911::ID_ENVELOPED_DATA,
        content: der::Any::encode_from(&enveloped).map_err(|e| format!("CMS: {e}"))?,
    };
    info.to_der().map_err(|e| format!("CMS: {e}"))
}
