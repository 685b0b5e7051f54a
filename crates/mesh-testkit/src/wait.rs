use std::future::Future;
use std::time::Duration;

use crate::Error;

/// Polls `check` every 20 ms until it yields `Some`, or fails with [`Error::Timeout`] naming
/// `what` after `timeout`. Tests use it instead of sleeping.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout { what: what.to_string(), after: timeout });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
