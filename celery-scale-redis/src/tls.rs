//! Reading and checking the certificate files of [`TlsConfig`] before any connection: a file
//! that is missing, holds no PEM certificate (or key), or a key that does not belong to its
//! certificate is an error naming the field, at validation and at source construction.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;
use crate::error::RedisSourceError;

/// The largest certificate or key file read: PEM bundles are kilobytes; anything this large is
/// not one.
const MAX_PEM_FILE: u64 = 1 << 20;

/// The files of `tls`, read and checked, as the client library takes them.
pub(crate) fn load(tls: &TlsConfig) -> Result<redis::TlsCertificates, RedisSourceError> {
    let root_cert = match &tls.ca_file {
        Some(path) => {
            let pem = read("tls.ca_file", path)?;
            check_ca(path, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert_path), Some(key_path)) => {
            let client_cert = read("tls.client_cert_file", cert_path)?;
            let client_key = read("tls.client_key_file", key_path)?;
            check_client(cert_path, &client_cert, key_path, &client_key)?;
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        // validate() rejects one without the other.
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, RedisSourceError> {
    let io = |source| RedisSourceError::TlsFile {
        field,
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_PEM_FILE {
        return Err(bad(
            field,
            path,
            format!("is {len} bytes: not a PEM file (at most {MAX_PEM_FILE})"),
            None,
        ));
    }
    std::fs::read(path).map_err(io)
}

fn bad(
    field: &'static str,
    path: &Path,
    detail: impl Into<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
) -> RedisSourceError {
    RedisSourceError::TlsContent {
        field,
        path: PathBuf::from(path),
        detail: detail.into(),
        source,
    }
}

fn certificates(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, RedisSourceError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(field, path, "is not valid PEM", Some(Box::new(e))))?;
    if certs.is_empty() {
        return Err(bad(
            field,
            path,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            None,
        ));
    }
    Ok(certs)
}

/// Every certificate of the CA file is a trust anchor rustls accepts.
fn check_ca(path: &Path, pem: &[u8]) -> Result<(), RedisSourceError> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certificates("tls.ca_file", path, pem)?
        .into_iter()
        .enumerate()
    {
        roots.add(cert).map_err(|e| {
            bad(
                "tls.ca_file",
                path,
                format!("certificate {} is not a usable CA certificate", i + 1),
                Some(Box::new(e)),
            )
        })?;
    }
    Ok(())
}

/// The chain parses, the key parses, and the key is the first certificate's.
fn check_client(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<(), RedisSourceError> {
    let chain = certificates("tls.client_cert_file", cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| {
        bad(
            "tls.client_key_file",
            key_path,
            "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            Some(Box::new(e)),
        )
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        let (field, path, detail) = match e {
            rustls::Error::InconsistentKeys(_) => (
                "tls.client_key_file",
                key_path,
                format!("is not the key of {}", cert_path.display()),
            ),
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => (
                "tls.client_cert_file",
                cert_path,
                "is not a usable certificate".to_string(),
            ),
            _ => (
                "tls.client_key_file",
                key_path,
                "is not a usable private key".to_string(),
            ),
        };
        bad(field, path, detail, Some(Box::new(e)))
    })?;
    Ok(())
}
