//! `amqps://`: the files of a [`TlsConfig`], read and checked when the source is made (with the
//! checks every TLS source shares, `celery-scale-tls`).
//!
//! lapin takes the CA as PEM text (it adds it to the web PKI roots) and the client identity as
//! a PEM certificate and key or as PKCS#12 bytes and a password, and reads them at every
//! connection, where a bad file would look like a network error. So they are checked here,
//! once, the same way lapin's TLS stack (tcp-stream, rustls) will read them.

use std::path::Path;

use celery_scale_tls::{TlsFileError, check_identity, read_file, read_pem_identity};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::TlsConfig;

/// Reads and checks the files of `tls`; the error names the field.
pub(crate) fn load(tls: &TlsConfig) -> Result<OwnedTLSConfig, TlsFileError> {
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
        (Some(cert), Some(key), _) => {
            let identity =
                read_pem_identity(("tls.client_cert_file", cert), ("tls.client_key_file", key))?;
            Some(OwnedIdentity::PKCS8 {
                pem: identity.cert_pem.clone(),
                key: identity.key_pem.clone(),
            })
        }
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

/// The PEM file of CA certificates that `field` names, as the PEM text lapin (and reqwest) take.
pub(crate) fn read_ca_file(field: &'static str, path: &Path) -> Result<String, TlsFileError> {
    let pem = celery_scale_tls::read_ca_file(field, path)?;
    String::from_utf8(pem)
        .map_err(|e| TlsFileError::new(field, path, "is not UTF-8 text", Some(Box::new(e))))
}

fn read_pkcs12(path: &Path, password: &str) -> Result<OwnedIdentity, TlsFileError> {
    const FIELD: &str = "tls.client_pkcs12_file";
    let der = read_file(FIELD, path)?;
    let store = p12_keystore::KeyStore::from_pkcs12(&der, password).map_err(|e| match e {
        p12_keystore::error::Error::MacError(_) => TlsFileError::new(
            "tls.client_pkcs12_password",
            path,
            "does not open the PKCS#12 file (its integrity check fails)",
            None,
        ),
        other => TlsFileError::new(
            FIELD,
            path,
            format!("is not a readable PKCS#12 file: {other}"),
            None,
        ),
    })?;
    let Some((_, chain)) = store.private_key_chain() else {
        return Err(TlsFileError::new(FIELD, path, "holds no private key", None));
    };
    // What lapin's TLS stack does with it: the chain as is, the key as PKCS#8.
    let certs = chain
        .chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect::<Vec<_>>();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
    check_identity(certs, key).map_err(|e| {
        TlsFileError::new(
            FIELD,
            path,
            "holds a certificate and key that cannot be used together",
            Some(Box::new(e)),
        )
    })?;
    Ok(OwnedIdentity::PKCS12 {
        der,
        password: password.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::AmqpSourceError;
    use celery_scale_tls::MAX_FILE_BYTES;

    #[test]
    fn finds_rustls_errors_inside_lapin_errors() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        let lapin_error = lapin::Error::from(io);
        assert_eq!(celery_scale_tls::rustls_error(&lapin_error), Some(&tls));
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(celery_scale_tls::rustls_error(&refused), None);
    }

    #[test]
    fn missing_files_name_their_field() {
        let missing = std::path::PathBuf::from("/nonexistent/celery-scale/ca.pem");
        let field = |tls: TlsConfig| match load(&tls) {
            Err(e) => {
                assert_eq!(e.path(), missing);
                e.field()
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
            Err(e) => {
                let core: celery_scale_core::Error = AmqpSourceError::from(e).into();
                core.to_string()
            }
            other => panic!("{other:?}"),
        };
        let ca = |p: &Path| TlsConfig::default().with_ca_file(p);
        for bad in [&text, &key_file] {
            let e = shown(ca(bad));
            assert!(e.contains("tls.ca_file: "), "{e}");
            assert!(e.contains("no PEM certificate"), "{e}");
        }
        assert!(shown(ca(&truncated)).contains("tls.ca_file"));
        assert!(shown(ca(&big)).contains("at most"));
        let e = shown(TlsConfig::default().with_client_cert(&cert_file, &text));
        assert!(
            e.contains("tls.client_key_file") && e.contains("no PEM private key"),
            "a bad key is named as the key, not as a bad URL: {e}"
        );
        let e = shown(TlsConfig::default().with_client_cert(&text, &key_file));
        assert!(e.contains("tls.client_cert_file"), "{e}");
        assert!(load(&TlsConfig::default().with_client_cert(&cert_file, &key_file)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
