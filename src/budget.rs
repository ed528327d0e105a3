//! The decode budget: the bytes of decoded pixels that all requests' decodes hold at once.
//!
//! `max_pixels` bounds one image, but without a shared bound many small encoded images that
//! decode to large bitmaps (decompression bombs) would be decoded side by side, each on its own
//! blocking thread, and take the process past its memory limit. Each decode reserves what its
//! header says it will hold before a pixel is decoded, and waits for room at most a bounded
//! time: a request that cannot get room in time is refused, never decoded.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Reservations are made in units of this many bytes (the semaphore counts `u32` permits).
const UNIT: u64 = 1 << 10;

/// Why a decode got no budget.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("the server is decoding other images and had no room for this one within {waited:?}; retry later")]
    Busy { waited: Duration },
    #[error("the deadline passed while the image waited to be decoded")]
    DeadlineExceeded,
}

/// Shared by every request of a server.
#[derive(Clone, Debug)]
pub struct DecodeBudget {
    units: Arc<Semaphore>,
    capacity: u64,
    wait: Duration,
}

/// Budget held by one decode; returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    _units: OwnedSemaphorePermit,
}

impl DecodeBudget {
    /// A budget of `bytes`, handed out to callers that wait at most `wait` for it.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let capacity = (bytes / UNIT).min(u64::from(u32::MAX)).max(1);
        Self {
            units: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            wait,
        }
    }

    /// Reserves `bytes` (which the caller has checked fit the whole budget), waiting until
    /// the configured wait or `deadline`, whichever comes first.
    pub async fn reserve(
        &self,
        bytes: u64,
        deadline: Option<Instant>,
    ) -> Result<Reservation, BudgetError> {
        let units = bytes.div_ceil(UNIT).clamp(1, self.capacity) as u32;
        let waited_until = Instant::now() + self.wait;
        let until = deadline.map_or(waited_until, |d| d.min(waited_until));
        let acquire = self.units.clone().acquire_many_owned(units);
        match tokio::time::timeout_at(until, acquire).await {
            Ok(permit) => Ok(Reservation {
                _units: permit.expect("the budget's semaphore is never closed"),
            }),
            Err(_) if deadline.is_some_and(|d| d <= waited_until) => {
                Err(BudgetError::DeadlineExceeded)
            }
            Err(_) => Err(BudgetError::Busy { waited: self.wait }),
        }
    }

    /// Bytes not reserved right now.
    pub fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn a_reservation_waits_for_room_and_gives_up_after_the_wait() {
        let budget = DecodeBudget::new(10 * MIB, Duration::from_millis(100));
        let held = budget.reserve(8 * MIB, None).await.unwrap();
        assert_eq!(budget.available(), 2 * MIB);

        let started = Instant::now();
        let refused = budget.reserve(4 * MIB, None).await.unwrap_err();
        assert_eq!(
            refused,
            BudgetError::Busy {
                waited: Duration::from_millis(100)
            }
        );
        assert_eq!(started.elapsed(), Duration::from_millis(100));

        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(4 * MIB, None).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert!(
            waiting.await.unwrap().is_ok(),
            "room freed in time is given"
        );
        assert_eq!(budget.available(), 10 * MIB);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_cuts_the_wait_short() {
        let budget = DecodeBudget::new(MIB, Duration::from_secs(5));
        let _held = budget.reserve(MIB, None).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(10);
        let refused = budget.reserve(1, Some(deadline)).await.unwrap_err();
        assert_eq!(refused, BudgetError::DeadlineExceeded);
        assert_eq!(Instant::now(), deadline);
    }
}
