//! What `/metrics` reads from the state at scrape time: credits out in each region, and the
//! webhook outbox's backlog.

use std::collections::BTreeMap;

use tollgate_core::{RegionId, Timestamp};

use super::{from_json, id, int, text, StateStore};
use crate::error::Result;
use crate::events::Event;

/// The deliveries still to make: how many, and when the event of the oldest occurred.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxBacklog {
    pub pending: i64,
    pub oldest_occurred_at: Option<Timestamp>,
}

impl StateStore {
    /// Micro-credits of grants handed to each region and neither taken back nor reconciled as
    /// spent. Overdraft room (the rows without a grant) is left out: it is a limit, not
    /// credits anyone was granted.
    pub async fn allocation_outstanding_micros(&self) -> Result<BTreeMap<RegionId, i64>> {
        let rows = sqlx::query(
            "SELECT region, CAST(COALESCE(SUM(installed - taken_back - spent), 0) AS BIGINT) \
             AS outstanding FROM authority_allocations WHERE grant_id <> '' GROUP BY region",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((id(row, "region")?, int(row, "outstanding")?)))
            .collect()
    }

    /// Webhook deliveries still pending (retries included), and the occurrence time of the
    /// oldest one's event: deliveries are written with their event, in the same transaction.
    pub async fn outbox_backlog(&self) -> Result<OutboxBacklog> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending FROM authority_deliveries WHERE state = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        let pending = int(&row, "pending")?;
        let oldest = sqlx::query(
            "SELECT o.body FROM authority_deliveries d \
             JOIN authority_outbox o ON o.event_id = d.event_id \
             WHERE d.state = 'pending' ORDER BY o.seq LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        let oldest_occurred_at = match oldest {
            Some(row) => Some(from_json::<Event>(&text(&row, "body")?)?.occurred_at),
            None => None,
        };
        Ok(OutboxBacklog {
            pending,
            oldest_occurred_at,
        })
    }
}
