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
    pub(super) async fn judge_debit(&mut self, decided: &Decided<'_>, key: &str, done: &Debited) {
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
        if balance != done.balance_after && std::env::var_os("TG_BAL_DEBUG").is_some() {
            self.debug_balance(decided, done, balance).await;
        }
    }

    async fn debug_balance(&self, decided: &Decided<'_>, done: &Debited, model: Credits) {
        let at = self.clock.at();
        let region = self.edges[decided.edge].region;
        let id = &self.accounts[decided.account].id;
        let store = &self.stores[region];
        let view = store.view(id, at).await.ok();
        let summary = store.account_summary(id).await.ok().flatten();
        let mine = self.edges[decided.edge].engine.leases().unflushed(id);
        let others: i64 = self
            .edges
            .iter()
            .enumerate()
            .filter(|(e, s)| *e != decided.edge && s.region == region)
            .map(|(_, s)| s.engine.leases().unflushed(id).micros())
            .sum();
        let ledger = self.link.node().ledger().account(id).await.ok();
        let (segs, leased, room, used, held) = view.as_ref().map_or((0, 0, 0, 0, 0), |v| {
            let segs: i64 = v
                .segments
                .iter()
                .filter(|s| s.is_active_at(at))
                .map(|s| s.remaining.micros())
                .sum();
            (
                segs,
                v.leased.micros(),
                v.overdraft_limit.micros() - v.overdraft_used.micros(),
                v.overdraft_used.micros(),
                v.held.micros(),
            )
        });
        let (outside, basis) = summary.as_ref().map_or((0, 0), |s| {
            (s.outside_at(at, None).micros(), s.debt_basis.micros())
        });
        let ideal = segs + leased - mine.micros() - others + outside - (basis - room).max(0);
        eprintln!(
            "BAL {} acct{} e{} edge {} model {} diff {} | ideal {} idealdiff {} | segs {} leased {} mine {} others {} room {} used {} held {} outside {} basis {} avail_after {} od {} | ledger {:?}",
            decided.kind.name(),
            decided.account,
            self.edges[decided.edge].uid,
            done.balance_after.micros(),
            model.micros(),
            done.balance_after.micros() - model.micros(),
            ideal,
            ideal - model.micros(),
            segs, leased, mine.micros(), others, room, used, held, outside, basis,
            done.available_after.micros(),
            done.overdraft.micros(),
            ledger.map(|l| (l.balance.micros(), l.debt.micros())),
        );
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
        let mut beyond_rule = None;
        if self.cfg.regions > 1 {
            let available = book.available(&feature(decided.feature), at);
            let Some(elsewhere) = self.held_elsewhere(region, decided.account).await else {
                return Ok(());
            };
            if multi_region_refusal_allowed(cause, answer, cost, available, elsewhere) {
                return Ok(());
            }
            self.report.oracle.beyond_rule(decided.kind);
            beyond_rule = Some(format!("the other regions hold {elsewhere}"));
        }
        let allowed = beyond_rule.is_none() && judge(self.cfg.regions, cause, answer);
        if !self.cfg.false_refusals_fail || allowed {
            return Ok(());
        }
        let mut said = vec![self.false_refusal_message(decided, cost, answer, cause.name())];
        said.extend(beyond_rule);
        let id = &self.accounts[decided.account].id;
        for (n, store) in self.stores.iter().enumerate() {
            said.push(match store.view(id, at).await {
                Ok(view) => format!(
                    "r{n} holds {} in {} segment(s), {} leased on {} lease(s), overdraft {} used of {}",
                    Credits::checked_sum(view.segments.iter().map(|s| s.remaining))
                        .unwrap_or(Credits::MAX),
                    view.segments.len(),
                    view.leased,
                    view.leases,
                    view.overdraft_used,
                    view.overdraft_limit
                ),
                Err(error) => format!("r{n}'s view failed: {error}"),
            });
        }
        said.push(match self.link.node().ledger().account(id).await {
            Ok(snapshot) => format!(
                "the ledger says balance {} debt {}",
                snapshot.balance, snapshot.debt
            ),
            Err(error) => format!("the ledger failed: {error}"),
        });
        Err(said.join("; "))
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
            "false refusal ({cause}): acct{} {} of {cost} on {} at edge e{} (r{}): \
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
