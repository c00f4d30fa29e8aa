//! `amqps://`: the files of a [`TlsConfig`], read and checked when the source is made, and the
//! handshake errors that need a change of configuration.
//!
//! lapin takes the CA as PEM text (it adds it to the web PKI roots) and the client identity as
//! a PEM certificate and key or as PKCS#12 bytes and a password, and reads them at every
//! connection, where a bad file would look like a network error. So they are checked here,
//! once, the same way lapin's TLS stack (tcp-stream, rustls) will read them.

use std::io;
use std::path::Path;
use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::TlsConfig;
use crate::error::AmqpSourceError;

/// Reads and checks the files of `tls`; the error names the field.
pub(crate) fn load(tls: &TlsConfig) -> Result<OwnedTLSConfig, AmqpSourceError> {
    let cert_chain = tls
        .ca_file
        .as_deref()
        .map(|path| read_ca_file("tls.ca_file", path))
        .transpose()?;
    let identity = match (
        &tls.client_cert_file,
        &tls.client_key_file,
        &tls.client_pkcs12_file,
    ) {
        (Some(cert), Some(key), _) => Some(read_pem_identity(cert, key)?),
        (_, _, Some(file)) => Some(read_pkcs12(
            file,
            tls.client_pkcs12_password.as_deref().unwrap_or_default(),
        )?),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn file_error(field: &'static str, path: &Path, source: io::Error) -> AmqpSourceError {
    AmqpSourceError::TlsFile {
        field,
        path: path.to_path_buf(),
        source,
    }
}

/// A file whose content is not what the field needs.
fn invalid(
    field: &'static str,
    path: &Path,
    why: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> AmqpSourceError {
    file_error(field, path, io::Error::new(io::ErrorKind::InvalidData, why))
}

/// The largest certificate, key or PKCS#12 file read (a CA bundle of the web PKI is ~220 KiB).
pub(crate) const MAX_FILE_BYTES: u64 = 4 << 20;

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, AmqpSourceError> {
    let size = std::fs::metadata(path)
        .map_err(|e| file_error(field, path, e))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(invalid(
            field,
            path,
            format!("is {size} bytes; a certificate or key file is at most {MAX_FILE_BYTES}"),
        ));
    }
    std::fs::read(path).map_err(|e| file_error(field, path, e))
}

/// The PEM certificates of `pem` (at least one).
fn certificates(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, AmqpSourceError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(field, path, format!("is not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(
            field,
            path,
            "is not a PEM certificate: it holds no -----BEGIN CERTIFICATE----- block",
        ));
    }
    Ok(certs)
}

/// The PEM file of CA certificates that `field` names, as the PEM text lapin (and reqwest) take,
/// once every certificate in it is a usable trust anchor (rustls would skip the others without a
/// word); the error names `field`.
pub(crate) fn read_ca_file(field: &'static str, path: &Path) -> Result<String, AmqpSourceError> {
    let pem = read(field, path)?;
    let certs = certificates(field, path, &pem)?;
    let mut store = rustls::RootCertStore::empty();
    let (_, ignored) = store.add_parsable_certificates(certs);
    if ignored > 0 {
        return Err(invalid(
            field,
            path,
            format!("{ignored} of its certificates cannot be used as a trust anchor"),
        ));
    }
    String::from_utf8(pem).map_err(|e| invalid(field, path, e))
}

fn read_pem_identity(cert_file: &Path, key_file: &Path) -> Result<OwnedIdentity, AmqpSourceError> {
    let pem = read("tls.client_cert_file", cert_file)?;
    let certs = certificates("tls.client_cert_file", cert_file, &pem)?;
    let key = read("tls.client_key_file", key_file)?;
    // The error says which PEM section is wrong, never what the key holds.
    let parsed = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        invalid(
            "tls.client_key_file",
            key_file,
            format!("holds no usable PEM private key: {e}"),
        )
    })?;
    check_pair(certs, parsed).map_err(|e| {
        invalid(
            "tls.client_key_file",
            key_file,
            format!("is not the key of tls.client_cert_file: {e}"),
        )
    })?;
    Ok(OwnedIdentity::PKCS8 { pem, key })
}

fn read_pkcs12(path: &Path, password: &str) -> Result<OwnedIdentity, AmqpSourceError> {
    const FIELD: &str = "tls.client_pkcs12_file";
    let der = read(FIELD, path)?;
    let store = p12_keystore::KeyStore::from_pkcs12(&der, password).map_err(|e| match e {
        p12_keystore::error::Error::MacError(_) => invalid(
            "tls.client_pkcs12_password",
            path,
            "does not open the PKCS#12 file (its integrity check fails)",
        ),
        other => invalid(FIELD, path, format!("not a readable PKCS#12 file: {other}")),
    })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(invalid(FIELD, path, "holds no private key"));
    };
    // What lapin's TLS stack does with it: the chain as is, the key as PKCS#8.
    let certs = chain
        .chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect::<Vec<_>>();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
    check_pair(certs, key).map_err(|e| {
        invalid(
            FIELD,
            path,
            format!("its certificate and key cannot be used together: {e}"),
        )
    })?;
    Ok(OwnedIdentity::PKCS12 {
        der,
        password: password.to_string(),
    })
}

/// Whether rustls accepts the certificate chain and key as a client identity (the key is
/// readable and is the first certificate's).
fn check_pair(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), rustls::Error> {
    if certs.is_empty() {
        return Err(rustls::Error::NoCertificatesPresented);
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_client_auth_cert(certs, key)
    .map(|_| ())
}

/// The rustls error in `e`'s chain, if the failure was one of TLS.
pub(crate) fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // The TLS stream reports rustls' error inside an `io::Error`, whose `source()` skips it.
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

/// Whether a TLS failure needs a change of configuration (certificates, port, scheme) rather
/// than a retry: the broker's certificate is not trusted or does not name the host, a client
/// certificate is missing or refused, or the peer does not speak TLS (an `amqps://` URL to a
/// plain AMQP port) or no protocol version or cipher suite in common.
pub(crate) fn is_config_problem(e: &rustls::Error) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_rustls_errors_inside_io_and_lapin_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls.clone());
        let lapin_error = lapin::Error::from(io);
        assert_eq!(rustls_error(&lapin_error), Some(&tls));
        assert!(is_config_problem(&tls));
        let refused = lapin::Error::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(rustls_error(&refused), None);
        assert!(!is_config_problem(&rustls::Error::AlertReceived(
            rustls::AlertDescription::InternalError
        )));
        assert!(is_config_problem(&rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
        )));
    }

    #[test]
    fn missing_files_name_their_field() {
        let missing = std::path::PathBuf::from("/nonexistent/celery-scale/ca.pem");
        let field = |tls: TlsConfig| match load(&tls) {
            Err(AmqpSourceError::TlsFile { field, path, .. }) => {
                assert_eq!(path, missing);
                field
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(TlsConfig::default().with_ca_file(&missing)),
            "tls.ca_file"
        );
        assert_eq!(
            field(TlsConfig::default().with_client_cert(&missing, &missing)),
            "tls.client_cert_file"
        );
        assert_eq!(
            field(TlsConfig::default().with_client_pkcs12(&missing, "pw")),
            "tls.client_pkcs12_file"
        );
        assert!(load(&TlsConfig::default()).unwrap() == OwnedTLSConfig::default());
    }

    #[test]
    fn files_that_are_not_what_the_field_needs_are_named() {
        let dir = std::env::temp_dir().join(format!("csa-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
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
        let cert_file = write("client.pem", cert.pem().as_bytes());
        let key_file = write("client.key", key.serialize_pem().as_bytes());
        let text = write("notes.txt", b"not a certificate at all\n");
        let truncated = write(
            "truncated.pem",
            b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let big = dir.join("big.pem");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let shown = |tls: TlsConfig| match load(&tls) {
            Err(e @ AmqpSourceError::TlsFile { .. }) => {
                let core: celery_scale_core::Error = e.into();
                core.to_string()
            }
            other => panic!("{other:?}"),
        };
        let ca = |p: &Path| TlsConfig::default().with_ca_file(p);
        for bad in [&text, &key_file] {
            let e = shown(ca(bad));
            assert!(e.contains("tls.ca_file: "), "{e}");
            assert!(e.contains("is not a PEM certificate"), "{e}");
        }
        assert!(shown(ca(&truncated)).contains("tls.ca_file"));
        assert!(shown(ca(&big)).contains("at most"));
        let e = shown(TlsConfig::default().with_client_cert(&cert_file, &text));
        assert!(
            e.contains("tls.client_key_file") && e.contains("no usable PEM private key"),
            "a bad key is named as the key, not as a bad URL: {e}"
        );
        let e = shown(TlsConfig::default().with_client_cert(&text, &key_file));
        assert!(e.contains("tls.client_cert_file"), "{e}");
        assert!(load(&TlsConfig::default().with_client_cert(&cert_file, &key_file)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
