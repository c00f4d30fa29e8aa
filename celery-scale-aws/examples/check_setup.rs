//! Checks this host's AWS setup the way celery-scale does at start: loads aws-config's default
//! chain with the settings given as TOML in `CELERY_SCALE_AWS_SETTINGS` (default: none) and
//! prints what is missing, or the region and endpoint it would use. Credentials are never
//! printed.
//!
//! ```sh
//! cargo run -p celery-scale-aws --example check_setup
//! ```

use std::time::Instant;

use celery_scale_aws::AwsSettings;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let settings: AwsSettings = match std::env::var("CELERY_SCALE_AWS_SETTINGS") {
        Ok(text) => toml::from_str(&text)?,
        Err(_) => AwsSettings::default(),
    };
    let started = Instant::now();
    let result = settings.sdk_config().await;
    let took = started.elapsed();
    match result {
        Ok(sdk) => {
            println!(
                "ok after {took:.2?}: region {:?}, endpoint {:?}",
                sdk.region().map(|r| r.to_string()),
                sdk.endpoint_url().map(celery_scale_core::redact_url),
            );
            Ok(())
        }
        Err(e) => {
            println!("error after {took:.2?}: {e}");
            std::process::exit(2);
        }
    }
}
