//! OpenPGP public keys and encryption (rPGP, pure Rust).
//!
//! A key is used only after it is checked: every key of every armored block in its file
//! parses, its binding signatures verify, it is neither revoked nor expired, it has a valid
//! encryption-capable (sub)key, and its algorithms are strong enough (RSA of at least 2048
//! bits; no DSA or ElGamal). A user ID with a revocation no longer covers its address. Messages are
//! SEIPD v1 with AES-256, so GnuPG 2.2 and Thunderbird read them, encrypted to every
//! recipient's key at once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pgp::composed::{
    ArmorOptions, Deserializable, MessageBuilder, SignedPublicKey, SignedPublicSubKey,
};
use pgp::crypto::sym::SymmetricKeyAlgorithm;
use pgp::packet::{Signature, SignatureType};
use pgp::types::KeyDetails;

/// A checked public key, ready to encrypt to.
#[derive(Clone)]
pub struct PgpKey {
    /// The file it came from.
    pub path: PathBuf,
    /// Lowercased email addresses of its user IDs.
    pub emails: Vec<String>,
    /// Hex fingerprint of the primary key.
    pub fingerprint: String,
    /// When it stops being usable: the earlier of the primary key's expiry and that of the
    /// encryption subkey it encrypts to (`None`: never).
    pub expires: Option<SystemTime>,
    key: SignedPublicKey,
    /// Index of the encryption subkey; `None` means the primary key encrypts.
    subkey: Option<usize>,
}

impl std::fmt::Debug for PgpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgpKey({} {})", self.fingerprint, self.path.display())
    }
}

/// Reads every key in an ASCII-armored file and checks each; any unusable key is an error.
pub fn load_keys(path: &Path, now: SystemTime) -> Result<Vec<PgpKey>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: reading the key: {e}", path.display()))?;
    parse_keys(&text, path, now)
}

/// [`load_keys`] on text read from `path` (fuzzed).
pub fn parse_keys(text: &str, path: &Path, now: SystemTime) -> Result<Vec<PgpKey>, String> {
    if text.contains("PRIVATE KEY BLOCK") {
        return Err(format!(
            "{}: is a private key; give the public key only",
            path.display()
        ));
    }
    let mut out = Vec::new();
    // Armored blocks may follow one another: every one is parsed and checked, none dropped.
    for block in armored_blocks(text).map_err(|e| format!("{}: {e}", path.display()))? {
        let (keys, _) = SignedPublicKey::from_string_many(block).map_err(|e| {
            format!(
                "{}: not an ASCII-armored OpenPGP public key: {e}",
                path.display()
            )
        })?;
        for key in keys {
            let key =
                key.map_err(|e| format!("{}: the key does not parse: {e}", path.display()))?;
            // Before any other check: an EXAMPLE key is refused as what it is, not as
            // expired or unable to encrypt.
            let fingerprint = hex::encode(key.fingerprint().as_bytes());
            if let Some(m) = crate::placeholder::pgp_key(&fingerprint) {
                return Err(format!("{}: {m}", path.display()));
            }
            out.push(check_key(path, key, now)?);
        }
    }
    if out.is_empty() {
        return Err(format!("{}: holds no public key", path.display()));
    }
    Ok(out)
}

const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
const END: &str = "-----END PGP PUBLIC KEY BLOCK-----";

/// The armored public-key blocks of a file, in order; anything else but white space
/// between or around them is an error (it could be a key that would silently be ignored).
fn armored_blocks(text: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        if !rest[..start].trim().is_empty() {
            return Err("text outside the armored key blocks".into());
        }
        let end = rest[start..]
            .find(END)
            .map(|e| start + e + END.len())
            .ok_or("an armored key block has no END line")?;
        out.push(&rest[start..end]);
        rest = &rest[end..];
    }
    if !rest.trim().is_empty() {
        return Err(if out.is_empty() {
            "not an ASCII-armored OpenPGP public key".into()
        } else {
            "text after the last armored key block".into()
        });
    }
    Ok(out)
}

/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;

/// Refuses weak public-key algorithms: RSA below [`MIN_RSA_BITS`], DSA, ElGamal.
fn strong_enough(params: &pgp::types::PublicParams, what: &str) -> Result<(), String> {
    use pgp::types::PublicParams;
    use rsa::traits::PublicKeyParts;
    match params {
        PublicParams::RSA(p) if p.key.n().bits() < MIN_RSA_BITS => Err(format!(
            "the {what} is RSA of {} bits; at least {MIN_RSA_BITS} are required",
            p.key.n().bits()
        )),
        PublicParams::DSA(_) => Err(format!("the {what} is DSA, which is refused")),
        PublicParams::Elgamal(_) => Err(format!("the {what} is ElGamal, which is refused")),
        _ => Ok(()),
    }
}

fn latest(sigs: &[&Signature]) -> Option<Signature> {
    sigs.iter()
        .max_by_key(|s| {
            s.created()
                .map(SystemTime::from)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        })
        .map(|s| (*s).clone())
}

fn expiry(created: SystemTime, sig: &Signature) -> Option<SystemTime> {
    let d: Duration = sig.key_expiration_time()?.into();
    if d.is_zero() { None } else { Some(created + d) }
}

fn can_encrypt(sig: &Signature) -> bool {
    let f = sig.key_flags();
    f.encrypt_comms() || f.encrypt_storage()
}

fn check_key(path: &Path, key: SignedPublicKey, now: SystemTime) -> Result<PgpKey, String> {
    let fingerprint = hex::encode(key.fingerprint().as_bytes()).to_uppercase();
    let ctx = |m: String| format!("{} (key {fingerprint}): {m}", path.display());
    strong_enough(key.primary_key.public_params(), "primary key").map_err(ctx)?;
    key.verify_bindings()
        .map_err(|e| ctx(format!("a binding signature does not verify: {e}")))?;
    if !key.details.revocation_signatures.is_empty() {
        return Err(ctx("the key is revoked".into()));
    }
    let created: SystemTime = key.primary_key.created_at().into();
    let self_sigs: Vec<&Signature> = key
        .details
        .users
        .iter()
        .flat_map(|u| u.signatures.iter())
        .chain(key.details.direct_signatures.iter())
        .collect();
    let primary_sig =
        latest(&self_sigs).ok_or_else(|| ctx("the key has no self-signature".into()))?;
    let primary_expires = expiry(created, &primary_sig);
    if let Some(exp) = primary_expires
        && exp <= now
    {
        return Err(ctx(format!("the key expired on {}", super::day(exp))));
    }
    // A user ID with a revocation no longer covers its address.
    let emails: Vec<String> = key
        .details
        .users
        .iter()
        .filter(|u| {
            !u.signatures
                .iter()
                .any(|s| s.typ() == Some(SignatureType::CertRevocation))
        })
        .filter_map(|u| std::str::from_utf8(u.id.id()).ok())
        .filter_map(email_of)
        .collect();

    let mut reasons = Vec::new();
    let mut subkey = None;
    let mut subkey_expires = None;
    for (i, sk) in key.public_subkeys.iter().enumerate() {
        match usable_subkey(sk, now) {
            Ok(expires) => {
                subkey = Some(i);
                subkey_expires = expires;
                break;
            }
            Err(r) => reasons.push(r),
        }
    }
    if let Some(i) = subkey {
        strong_enough(
            key.public_subkeys[i].key.public_params(),
            "encryption subkey",
        )
        .map_err(ctx)?;
    }
    let primary_encrypts = key.primary_key.algorithm().can_encrypt() && can_encrypt(&primary_sig);
    if subkey.is_none() && !primary_encrypts {
        let why = if reasons.is_empty() {
            "it has no encryption subkey".to_string()
        } else {
            reasons.join("; ")
        };
        return Err(ctx(format!("no usable encryption key: {why}")));
    }
    let expires = match (primary_expires, subkey_expires) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(PgpKey {
        path: path.to_path_buf(),
        emails,
        fingerprint,
        expires,
        key,
        subkey,
    })
}

/// Whether a subkey can be encrypted to now; its expiry when it can.
fn usable_subkey(sk: &SignedPublicSubKey, now: SystemTime) -> Result<Option<SystemTime>, String> {
    if sk
        .signatures
        .iter()
        .any(|s| s.typ() == Some(SignatureType::SubkeyRevocation))
    {
        return Err("the encryption subkey is revoked".into());
    }
    let bindings: Vec<&Signature> = sk
        .signatures
        .iter()
        .filter(|s| s.typ() == Some(SignatureType::SubkeyBinding))
        .collect();
    let sig = latest(&bindings).ok_or("a subkey has no binding signature")?;
    if !can_encrypt(&sig) {
        return Err("a subkey is not flagged for encryption".into());
    }
    if !sk.key.algorithm().can_encrypt() {
        return Err("a subkey's algorithm cannot encrypt".into());
    }
    let created: SystemTime = sk.key.created_at().into();
    let expires = expiry(created, &sig);
    if let Some(exp) = expires
        && exp <= now
    {
        return Err(format!(
            "the encryption subkey expired on {}",
            super::day(exp)
        ));
    }
    Ok(expires)
}

/// `Name <a@b>` → `a@b`; a bare address is itself.
fn email_of(uid: &str) -> Option<String> {
    let addr = match (uid.rfind('<'), uid.rfind('>')) {
        (Some(a), Some(b)) if a < b => &uid[a + 1..b],
        _ => uid.trim(),
    };
    super::valid_address(addr).then(|| addr.to_ascii_lowercase())
}

/// Encrypts to every key at once (one session key), ASCII-armored.
pub fn encrypt(keys: &[&PgpKey], plaintext: &[u8]) -> Result<String, String> {
    let mut rng = rand::thread_rng();
    let mut builder = MessageBuilder::from_bytes("", plaintext.to_vec())
        .seipd_v1(&mut rng, SymmetricKeyAlgorithm::AES256);
    for k in keys {
        let r = match k.subkey {
            Some(i) => builder.encrypt_to_key(&mut rng, &k.key.public_subkeys[i]),
            None => builder.encrypt_to_key(&mut rng, &k.key),
        };
        r.map_err(|e| format!("encrypting to {}: {e}", k.fingerprint))?;
    }
    builder
        .to_armored_string(&mut rng, ArmorOptions::default())
        .map_err(|e| format!("OpenPGP encryption: {e}"))
}
