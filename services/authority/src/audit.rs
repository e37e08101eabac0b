//! The audit of Admin changes: the tower layer (from `tollgate-serve`) writes into the
//! authority's append-only audit table, and `ListAuditRecords` reads it back.

use std::sync::Arc;

use tollgate_authority::state::{AuditEntry, AuditRow, AUDIT_PAGE_MAX};
use tollgate_authority::{Clock, StateStore};
use tollgate_proto::decode::timestamp_to_pb;
use tollgate_proto::{decode, pb};
use tollgate_serve::audit::{AuditFuture, AuditLayer, AuditRecord, AuditSink};
use tonic::Status;

use crate::coordination::authority_error;
use crate::server::REQUEST_BYTES_MAX;

/// Records per `ListAuditRecords` page when the request does not say.
pub const AUDIT_PAGE_DEFAULT: u32 = 100;

/// Writes audit records into the authority's state, stamped with its clock.
pub struct StateAudit {
    state: StateStore,
    clock: Arc<dyn Clock>,
}

impl AuditSink for StateAudit {
    fn record(&self, record: AuditRecord) -> AuditFuture<'_> {
        Box::pin(async move {
            let entry = AuditEntry {
                key_name: record.key_name,
                method: record.method,
                account_id: record.account_id,
                idempotency_key: record.idempotency_key,
                outcome: record.outcome.as_str().to_owned(),
            };
            self.state
                .append_audit(&entry, self.clock.now())
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The layer every Admin service is served behind.
pub fn admin_audit_layer(
    state: StateStore,
    clock: Arc<dyn Clock>,
) -> Result<AuditLayer, crate::server::ServeError> {
    AuditLayer::new(
        Arc::new(StateAudit { state, clock }),
        tollgate_proto::FILE_DESCRIPTOR_SET,
        "tollgate.v1.Admin",
        REQUEST_BYTES_MAX,
    )
    .map_err(crate::server::ServeError::Audit)
}

pub async fn list(
    state: &StateStore,
    request: pb::ListAuditRecordsRequest,
) -> Result<pb::ListAuditRecordsReply, Status> {
    if !request.account_id.is_empty() {
        decode::id::<tollgate_core::AccountId>("account_id", &request.account_id)?;
    }
    if request.page_size > AUDIT_PAGE_MAX {
        return Err(Status::invalid_argument(format!(
            "page_size: at most {AUDIT_PAGE_MAX}"
        )));
    }
    let size = if request.page_size == 0 {
        AUDIT_PAGE_DEFAULT
    } else {
        request.page_size
    };
    let after = match request.page_token.as_str() {
        "" => 0,
        token => token
            .parse::<i64>()
            .ok()
            .filter(|after| *after >= 0)
            .ok_or_else(|| Status::invalid_argument("page_token: not a token of this list"))?,
    };
    let rows = state
        .audit_after(after, &request.account_id, size)
        .await
        .map_err(authority_error)?;
    let next_page_token = match rows.last() {
        Some(last) if rows.len() == size as usize => last.seq.to_string(),
        _ => String::new(),
    };
    Ok(pb::ListAuditRecordsReply {
        records: rows.iter().map(record_to_pb).collect(),
        next_page_token,
    })
}

fn record_to_pb(row: &AuditRow) -> pb::AuditRecord {
    pb::AuditRecord {
        sequence: u64::try_from(row.seq).unwrap_or_default(),
        recorded_at: Some(timestamp_to_pb(row.recorded_at)),
        key_name: row.entry.key_name.clone(),
        method: row.entry.method.clone(),
        account_id: row.entry.account_id.clone(),
        idempotency_key: row.entry.idempotency_key.clone(),
        outcome: row.entry.outcome.clone(),
    }
}
