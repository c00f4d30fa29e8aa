//! Reading and checking the certificate files of [`TlsConfig`] before any connection, with
//! the checks every TLS source shares (`celery-scale-tls`): a file that is missing, holds no
//! PEM certificate (or key), or a key that does not belong to its certificate is an error naming
//! the field, at validation and at source construction.

use celery_scale_tls::{TlsFileError, read_ca_file, read_pem_identity};

use crate::config::TlsConfig;

/// The fields of the Sentinels' files (`sentinel_kwargs`), for [`load_named`].
pub(crate) const SENTINEL_FIELDS: [&str; 3] = [
    "broker_transport_options.sentinel_kwargs.ssl_ca_certs",
    "broker_transport_options.sentinel_kwargs.ssl_certfile",
    "broker_transport_options.sentinel_kwargs.ssl_keyfile",
];

/// The files of `tls`, read and checked, as the client library takes them.
pub(crate) fn load(tls: &TlsConfig) -> Result<redis::TlsCertificates, TlsFileError> {
    load_named(
        tls,
        ["tls.ca_file", "tls.client_cert_file", "tls.client_key_file"],
    )
}

/// As [`load`], the errors naming `fields` (CA, client certificate, client key).
pub(crate) fn load_named(
    tls: &TlsConfig,
    [ca, cert_field, key_field]: [&'static str; 3],
) -> Result<redis::TlsCertificates, TlsFileError> {
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|path| read_ca_file(ca, path))
        .transpose()?;
    let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let identity = read_pem_identity((cert_field, cert), (key_field, key))?;
            Some(redis::ClientTlsConfig {
                client_cert: identity.cert_pem.clone(),
                client_key: identity.key_pem.clone(),
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
