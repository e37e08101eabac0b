//! The edges' link to the authority: the cold path (`AllocationRequester`) in process, as the
//! embedded node wires it, behind a switch the simulator flips to cut it (the authority
//! crashed or partitioned from the edges). It records every failed request, so the simulator
//! can tell an answer the fault explains from one it does not.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tollgate_authority::allocator::AllocationOutcome;
use tollgate_authority::{Authority, AuthorityError};
use tollgate_core::{AccountId, Credits, FeatureKey, RegionId};
use tollgate_edge::{AllocationAnswer, AllocationRequester, EngineError};
use tollgate_ledger::SqliteLedger;

use crate::faulty::FaultyRegion;

pub type Node = Authority<SqliteLedger, FaultyRegion>;

pub struct AuthorityLink {
    /// The authority now running (a restart replaces it).
    node: Mutex<Arc<Node>>,
    cut: AtomicBool,
    /// Requests that failed: the link was cut, or the authority failed on an injected fault.
    failures: AtomicU64,
    /// Failures no fault explains (the simulator fails the step on them).
    unexplained: Mutex<Vec<String>>,
}

impl AuthorityLink {
    pub fn new(node: Arc<Node>) -> Self {
        AuthorityLink {
            node: Mutex::new(node),
            cut: AtomicBool::new(false),
            failures: AtomicU64::new(0),
            unexplained: Mutex::new(Vec::new()),
        }
    }

    pub fn node(&self) -> Arc<Node> {
        Arc::clone(&self.node.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn replace(&self, node: Arc<Node>) {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = node;
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }

    /// How many requests have failed so far (compare before and after an edge call).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    pub fn take_unexplained(&self) -> Vec<String> {
        std::mem::take(&mut *self.unexplained.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A failed request as the edge sees it: unavailable. Only a region error (an injected
    /// install fault, a region down) is explained by a fault.
    fn failed(&self, error: AuthorityError, faults: bool) -> EngineError {
        self.failures.fetch_add(1, Ordering::SeqCst);
        if !(faults && matches!(error, AuthorityError::Region { .. })) {
            self.unexplained
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(error.to_string());
        }
        EngineError::Unavailable(error.to_string())
    }
}

/// One region's edges asking the authority.
pub struct RegionAllocator {
    pub link: Arc<AuthorityLink>,
    pub region: RegionId,
    pub faults: bool,
}

impl AllocationRequester for RegionAllocator {
    fn request_allocation<'a>(
        &'a self,
        account: &'a AccountId,
        feature: Option<&'a FeatureKey>,
        needed: Credits,
    ) -> Pin<Box<dyn Future<Output = Result<AllocationAnswer, EngineError>> + Send + 'a>> {
        Box::pin(async move {
            if self.link.is_cut() {
                self.link.failures.fetch_add(1, Ordering::SeqCst);
                return Err(EngineError::Unavailable(
                    "authority unreachable (simulated)".into(),
                ));
            }
            let node = self.link.node();
            match node
                .request_allocation(&self.region, account, feature, needed)
                .await
            {
                Ok(AllocationOutcome::Allocated(allocation)) => Ok(AllocationAnswer {
                    exists: true,
                    unallocated: Some(allocation.unallocated),
                }),
                Ok(AllocationOutcome::UnknownAccount) => Ok(AllocationAnswer::UNKNOWN),
                Err(error) => Err(self.link.failed(error, self.faults)),
            }
        })
    }
}
