//! The oracle's side of the simulator: every spending decision an edge gives is handed to the
//! reference model (`crate::shadow`) at the same event time, and every refusal for want of
//! credits is judged against it (`crate::oracle`).

use tollgate_core::{BurnPlan, Credits, DebitId};
use tollgate_edge::{Authorized, Debited, Refused};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

use super::{credits, feature, Sim};
use crate::oracle::{judge, multi_region_refusal_allowed, Answer, Circumstances, DecisionKind};

/// Grants listed in a false refusal's message at most.
const GRANTS_LISTED_MAX: usize = 6;

/// Which edge decided, for which account, what kind of decision, on which feature.
pub(super) struct Decided<'a> {
    pub edge: usize,
    pub account: usize,
    pub kind: DecisionKind,
    pub feature: &'a str,
}

/// An edge's refusal and what the simulator knows about the request.
pub(super) struct Refusal<'a> {
    pub refused: &'a Refused,
    /// The key was acknowledged before (and not lost): a client retry.
    pub retry: bool,
    /// The authority could not answer the edge during the request (see `authority_failed_since`).
    pub authority_failed: bool,
}

/// The refusals the oracle judges (for want of credits), with their cost.
fn answer_of(refused: &Refused) -> Option<(Credits, Answer)> {
    match refused {
        Refused::Insufficient {
            cost, available, ..
        } => Some((
            *cost,
            Answer::Insufficient {
                available: *available,
            },
        )),
        Refused::AuthorityUnreachable {
            cost, available, ..
        } => Some((
            *cost,
            Answer::AuthorityUnreachable {
                available: *available,
            },
        )),
        _ => None,
    }
}

impl Sim {
    /// A new acknowledged debit: the model takes it at the same event time, with the draws
    /// the edge reported. Counts it beyond the model when the rules would have refused it, off
    /// the burn-down order when the rules would have drawn otherwise, and compares the
    /// balance the edge reported after it with the model's.
    pub(super) fn judge_debit(&mut self, decided: &Decided<'_>, key: &str, done: &Debited) {
        let at = self.clock.at();
        let ack = (self.edges[decided.edge].region, key.to_owned());
        let Some(debit_id) = self.acks.get(&ack).map(|a| a.debit_id.clone()) else {
            return;
        };
        let charge = (
            ack,
            DebitId::new(debit_id).unwrap_or_else(|e| panic!("debit id: {e}")),
        );
        let drawn = BurnPlan {
            draws: done.draws.clone(),
            overdraft: done.overdraft,
        };
        let shadow = &mut self.shadows[decided.account];
        let cost = done.priced.cost;
        let applied = shadow.debit(charge, feature(decided.feature), cost, drawn, at);
        let balance = shadow.book().balance(at);
        let figures = &mut self.report.oracle;
        figures.decision(decided.kind);
        if !applied.allowed {
            figures.overspend(decided.kind);
        }
        if !applied.in_order {
            figures.off_order(decided.kind);
        }
        if !applied.as_reported {
            figures.model_disagreements += 1;
        }
        figures.balance(decided.kind, balance == done.balance_after);
    }

    /// A new hold: the model places it too.
    pub(super) fn judge_hold(&mut self, decided: &Decided<'_>, held: &Authorized) {
        let at = self.clock.at();
        let shadow = &mut self.shadows[decided.account];
        let allowed = shadow.authorize(
            held.hold_id.clone(),
            feature(decided.feature),
            held.priced.cost,
            at,
            held.expires_at,
        );
        self.report.oracle.decision(decided.kind);
        if !allowed {
            self.report.oracle.overspend(decided.kind);
        }
    }

    /// A capture, release or refund the model could not apply as the edges did is counted.
    pub(super) fn model_applied(&mut self, applied: bool) {
        if !applied {
            self.report.oracle.model_disagreements += 1;
        }
    }

    /// A refusal for want of credits, judged against the model at the same event time. A
    /// false refusal is counted by kind and cause; with one region it fails the step unless
    /// [`judge`] allows it.
    pub(super) async fn judge_refusal(
        &mut self,
        decided: &Decided<'_>,
        refusal: &Refusal<'_>,
    ) -> Result<(), String> {
        let Some((cost, answer)) = answer_of(refusal.refused) else {
            return Ok(());
        };
        self.report.oracle.decision(decided.kind);
        let at = self.clock.at();
        let book = self.shadows[decided.account].book();
        if book.plan(&feature(decided.feature), at, cost).is_err() {
            self.report.oracle.true_refusal(decided.kind);
            return Ok(());
        }
        let region = self.edges[decided.edge].region;
        let circumstances = Circumstances {
            authority_failed: refusal.authority_failed,
            retry_of_acknowledged: refusal.retry,
            region_down: self.stores[region].is_down(),
            crashed_edge_lease: self.crashed_edge_lease(region, decided.account).await,
        };
        let cause = circumstances.cause();
        self.report.oracle.false_refusal(decided.kind, cause);
        if self.cfg.regions > 1 {
            let available = book.available(&feature(decided.feature), at);
            let Some(elsewhere) = self.held_elsewhere(region, decided.account).await else {
                return Ok(());
            };
            if multi_region_refusal_allowed(cause, answer, cost, available, elsewhere) {
                return Ok(());
            }
            self.report.oracle.beyond_rule(decided.kind);
            if !self.cfg.false_refusals_fail {
                return Ok(());
            }
            return Err(format!(
                "refusal outside the multi-region rule ({}): {} of {cost} on {} at edge e{} (r{region}): \
                 the model has {available} available, the other regions hold {elsewhere}, the edge answered {answer}",
                cause.name(),
                decided.kind.name(),
                decided.feature,
                self.edges[decided.edge].uid,
            ));
        }
        if !self.cfg.false_refusals_fail || judge(self.cfg.regions, cause, answer) {
            return Ok(());
        }
        let id = &self.accounts[decided.account].id;
        let region_said = match self.stores[region].view(id, at).await {
            Ok(view) => format!(
                "the region holds {} in {} segment(s), {} leased on {} lease(s), overdraft {} used of {}",
                Credits::checked_sum(view.segments.iter().map(|s| s.remaining))
                    .unwrap_or(Credits::MAX),
                view.segments.len(),
                view.leased,
                view.leases,
                view.overdraft_used,
                view.overdraft_limit
            ),
            Err(error) => format!("the region's view failed: {error}"),
        };
        let ledger_said = match self.link.node().ledger().account(id).await {
            Ok(snapshot) => format!(
                "the ledger says balance {} debt {}",
                snapshot.balance, snapshot.debt
            ),
            Err(error) => format!("the ledger failed: {error}"),
        };
        Err(format!(
            "{}; {region_said}; {ledger_said}",
            self.false_refusal_message(decided, cost, answer, cause.name())
        ))
    }

    /// What the regions other than `region` hold of the account: their active segments, what
    /// their edges' leases hold, and their overdraft room. `None` when one of them cannot be
    /// read (it is down: what it holds is out of reach, a fault the rule allows).
    async fn held_elsewhere(&self, region: usize, account: usize) -> Option<Credits> {
        let id = &self.accounts[account].id;
        let at = self.clock.at();
        let mut held = 0_i64;
        for (other, store) in self.stores.iter().enumerate() {
            if other == region {
                continue;
            }
            let view = store.view(id, at).await.ok()?;
            let segments: i64 = view
                .segments
                .iter()
                .filter(|s| s.is_active_at(at))
                .map(|s| s.remaining.micros())
                .sum();
            let room = view
                .overdraft_limit
                .saturating_sub_floor_zero(view.overdraft_used);
            held += segments + view.leased.micros() + room.micros();
        }
        Some(Credits::from_micros(held))
    }

    /// Whether the region has leases on the account that no live edge holds: an edge crashed
    /// with them, and their credits are out of reach until they expire.
    async fn crashed_edge_lease(&self, region: usize, account: usize) -> bool {
        let id = &self.accounts[account].id;
        let Ok(view) = self.stores[region].view(id, self.clock.at()).await else {
            return false;
        };
        let live = self
            .edges
            .iter()
            .filter(|e| e.region == region && e.engine.leases().holds(id))
            .count() as u64;
        view.leases > live
    }

    fn false_refusal_message(
        &self,
        decided: &Decided<'_>,
        cost: Credits,
        answer: Answer,
        cause: &str,
    ) -> String {
        let at = self.clock.at();
        let book = self.shadows[decided.account].book();
        let gate = feature(decided.feature);
        let eligible = book.eligible(&gate, at);
        let listed: Vec<String> = eligible
            .iter()
            .take(GRANTS_LISTED_MAX)
            .map(|(id, left)| format!("{id} {left}"))
            .collect();
        let more = eligible.len().saturating_sub(GRANTS_LISTED_MAX);
        format!(
            "false refusal with one region ({cause}): acct{} {} of {cost} on {} at edge e{} (r{}): \
             the account's ledger has {} available (eligible grants: {}{}; debt {}, overdraft limit {}), \
             the edge answered {answer}",
            decided.account,
            decided.kind.name(),
            decided.feature,
            self.edges[decided.edge].uid,
            self.edges[decided.edge].region,
            book.available(&gate, at),
            if listed.is_empty() { "none".to_owned() } else { listed.join(", ") },
            if more > 0 { format!(" and {more} more") } else { String::new() },
            book.debt(),
            credits(self.accounts[decided.account].overdraft_micros),
        )
    }

    /// Folds each account's settled history into its base book (see `ShadowAccount::fold`):
    /// a spend may still be lost while it is acknowledged, not lost, and on edges only.
    pub(super) fn fold_shadows(&mut self) {
        let acks = &self.acks;
        for shadow in &mut self.shadows {
            shadow.fold(|ack| acks.get(ack).is_some_and(|a| !a.durable && !a.lost));
        }
    }
}
