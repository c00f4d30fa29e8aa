#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::error::Error as StdError;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The largest certificate, key or PKCS#12 file read (a CA bundle of the web PKI is ~220 KiB).
pub const MAX_FILE_BYTES: u64 = 4 << 20;

/// A TLS file of the configuration that cannot be read or does not hold what its field needs.
/// The message names the field and the file, never the file's content.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {path:?} {problem}")]
pub struct TlsFileError {
    field: &'static str,
    path: PathBuf,
    problem: String,
    #[source]
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl TlsFileError {
    /// A problem with the file `path` of configuration field `field`; `problem` completes the
    /// sentence "`path` ..." (e.g. "holds no private key").
    pub fn new(
        field: &'static str,
        path: &Path,
        problem: impl Into<String>,
        source: Option<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        TlsFileError {
            field,
            path: path.to_path_buf(),
            problem: problem.into(),
            source,
        }
    }

    /// The configuration field, e.g. `tls.ca_file`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What is wrong with it, with the reasons of its sources (for a configuration error that
    /// names the field separately).
    pub fn problem(&self) -> String {
        let mut text = format!("{:?} {}", self.path, self.problem);
        let mut next = self
            .source
            .as_deref()
            .map(|s| s as &(dyn StdError + 'static));
        while let Some(e) = next {
            text.push_str(": ");
            text.push_str(&e.to_string());
            next = e.source();
        }
        text
    }
}

/// Reads the file of `field`, at most [`MAX_FILE_BYTES`].
pub fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let unreadable =
        |e: io::Error| TlsFileError::new(field, path, "cannot be read", Some(e.into()));
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > MAX_FILE_BYTES {
        return Err(TlsFileError::new(
            field,
            path,
            format!("is {size} bytes; a certificate or key file is at most {MAX_FILE_BYTES}"),
            None,
        ));
    }
    std::fs::read(path).map_err(unreadable)
}

/// The PEM certificates of `pem`, the content of `path` (at least one).
pub fn certificates(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsFileError::new(
                field,
                path,
                "is not a PEM certificate file",
                Some(Box::new(e)),
            )
        })?;
    if certs.is_empty() {
        return Err(TlsFileError::new(
            field,
            path,
            "holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)",
            None,
        ));
    }
    Ok(certs)
}

/// Reads the PEM file of CA certificates that `field` names and returns its content once every
/// certificate in it is a trust anchor rustls accepts (rustls would skip the others without a
/// word, and the handshake would fail later as "unknown issuer").
pub fn read_ca_file(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    let pem = read_file(field, path)?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certificates(field, path, &pem)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            TlsFileError::new(
                field,
                path,
                format!("certificate {} cannot be used as a trust anchor", i + 1),
                Some(Box::new(e)),
            )
        })?;
    }
    Ok(pem)
}

/// A PEM client certificate chain and its private key, read and checked.
#[derive(Clone, PartialEq, Eq)]
pub struct PemIdentity {
    /// The certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for PemIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"***")
            .finish()
    }
}

/// Reads the client certificate of `cert_field` and the key of `key_field` and checks that the
/// key parses and belongs to the first certificate.
pub fn read_pem_identity(
    (cert_field, cert_path): (&'static str, &Path),
    (key_field, key_path): (&'static str, &Path),
) -> Result<PemIdentity, TlsFileError> {
    let cert_pem = read_file(cert_field, cert_path)?;
    let chain = certificates(cert_field, cert_path, &cert_pem)?;
    let key_pem = read_file(key_field, key_path)?;
    // The error says which PEM section is wrong, never what the key holds.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        TlsFileError::new(
            key_field,
            key_path,
            "holds no PEM private key rustls can use (PKCS#8, PKCS#1 or SEC1)",
            Some(Box::new(e)),
        )
    })?;
    check_identity(chain, key).map_err(|e| match e {
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            TlsFileError::new(
                cert_field,
                cert_path,
                "is not a usable client certificate",
                Some(Box::new(e)),
            )
        }
        _ => TlsFileError::new(
            key_field,
            key_path,
            format!("is not the key of {cert_field}"),
            Some(Box::new(e)),
        ),
    })?;
    Ok(PemIdentity { cert_pem, key_pem })
}

/// Whether rustls accepts `chain` and `key` as a client identity: the key is usable and is the
/// first certificate's.
pub fn check_identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    if chain.is_empty() {
        return Err(rustls::Error::NoCertificatesPresented);
    }
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = rustls::sign::CertifiedKey::from_der(chain, key, &provider)?;
    certified.keys_match()
}

/// The rustls error somewhere in `e`'s chain, if the failure was one of TLS. Client libraries
/// keep their cause as an `Arc<dyn Error>` (redis) or inside an `io::Error`, whose `source()`
/// skips it (tokio-rustls, lapin's TLS stream): both are looked into.
pub fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        let err: &(dyn StdError + 'static) =
            match err.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
                Some(arc) => arc.as_ref(),
                None => err,
            };
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls);
        }
        next = err.source();
    }
    None
}

/// Whether a TLS failure needs a change of configuration (certificates, host name, port,
/// scheme) rather than a retry: the server's certificate is not trusted, expired, revoked or
/// does not name the host; a client certificate is missing or refused; the peer does not speak
/// TLS (a TLS URL to a plain port) or shares no protocol version or cipher suite. An internal
/// error alert or a handshake cut short by a restarting server may pass on a retry.
pub fn needs_config_change(e: &rustls::Error) -> bool {
    use rustls::AlertDescription as Alert;
    use rustls::Error as E;
    matches!(
        e,
        E::InvalidCertificate(_)
            | E::NoCertificatesPresented
            | E::UnsupportedNameType
            | E::InvalidCertRevocationList(_)
            | E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerIncompatible(_)
            | E::AlertReceived(
                Alert::BadCertificate
                    | Alert::UnsupportedCertificate
                    | Alert::CertificateRevoked
                    | Alert::CertificateExpired
                    | Alert::CertificateUnknown
                    | Alert::CertificateRequired
                    | Alert::UnknownCA
                    | Alert::AccessDenied
                    | Alert::HandshakeFailure
                    | Alert::ProtocolVersion
                    | Alert::InsufficientSecurity
            )
    )
}

/// Whether `e`'s chain holds a rustls error that [needs a change of
/// configuration](needs_config_change).
pub fn is_config_problem(e: &(dyn StdError + 'static)) -> bool {
    rustls_error(e).is_some_and(needs_config_change)
}

/// Installs aws-lc-rs as rustls' process-wide crypto provider unless one is installed: the
/// provider lapin and the AWS SDK use, so one process has one.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one first; either is fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_errors_inside_io_and_arc_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls.clone());
        assert_eq!(rustls_error(&io), Some(&tls));
        let arc: Arc<dyn StdError + Send + Sync> = Arc::new(io);
        #[derive(Debug, thiserror::Error)]
        #[error("client error")]
        struct Client(#[source] Arc<dyn StdError + Send + Sync>);
        assert_eq!(rustls_error(&Client(arc)), Some(&tls));
        assert!(is_config_problem(&Client(Arc::new(tls.clone()))));
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(rustls_error(&refused), None);
        assert!(!is_config_problem(&refused));
    }

    #[test]
    fn expired_and_refused_certificates_need_a_change_and_internal_errors_a_retry() {
        use rustls::AlertDescription as Alert;
        for alert in [
            Alert::CertificateExpired,
            Alert::CertificateRequired,
            Alert::UnknownCA,
            Alert::BadCertificate,
        ] {
            assert!(needs_config_change(&rustls::Error::AlertReceived(alert)));
        }
        assert!(needs_config_change(&rustls::Error::InvalidCertificate(
            rustls::CertificateError::Expired
        )));
        assert!(!needs_config_change(&rustls::Error::AlertReceived(
            Alert::InternalError
        )));
        assert!(!needs_config_change(&rustls::Error::HandshakeNotComplete));
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cs-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_that_are_not_what_the_field_needs_are_named_without_their_content() {
        let dir = dir("files");
        let write = |name: &str, content: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let cert_file = write("client.pem", cert.pem().as_bytes());
        let key_file = write("client.key", key.serialize_pem().as_bytes());
        let other_key_file = write("other.key", other_key.serialize_pem().as_bytes());
        let text = write("notes.txt", b"not a certificate at all\n");
        let big = dir.join("big.pem");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let missing = dir.join("missing.pem");

        let e = read_ca_file("tls.ca_file", &text).unwrap_err();
        assert_eq!((e.field(), e.path()), ("tls.ca_file", text.as_path()));
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = read_ca_file("tls.ca_file", &key_file).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        assert!(
            read_ca_file("tls.ca_file", &big)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
        let e = read_ca_file("tls.ca_file", &missing).unwrap_err();
        assert!(e.problem().contains("cannot be read"), "{}", e.problem());
        assert_eq!(
            read_ca_file("tls.ca_file", &cert_file).unwrap(),
            cert.pem().as_bytes()
        );

        fn cert_of(c: &Path) -> (&'static str, &Path) {
            ("tls.client_cert_file", c)
        }
        fn key_of(k: &Path) -> (&'static str, &Path) {
            ("tls.client_key_file", k)
        }
        let e = read_pem_identity(cert_of(&cert_file), key_of(&text)).unwrap_err();
        assert_eq!(e.field(), "tls.client_key_file");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
        let e = read_pem_identity(cert_of(&cert_file), key_of(&other_key_file)).unwrap_err();
        assert_eq!(e.field(), "tls.client_key_file");
        assert!(e.to_string().contains("is not the key of"), "{e}");
        let secret = other_key.serialize_pem();
        let secret_line = secret.lines().nth(1).unwrap();
        assert!(!e.problem().contains(secret_line), "the key never shows");
        let e = read_pem_identity(cert_of(&text), key_of(&key_file)).unwrap_err();
        assert_eq!(e.field(), "tls.client_cert_file");
        let identity = read_pem_identity(cert_of(&cert_file), key_of(&key_file)).unwrap();
        assert!(!format!("{identity:?}").contains(secret_line));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
