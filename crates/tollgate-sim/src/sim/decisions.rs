//! The oracle's side of the simulator: every spending decision an edge gives is handed to the
//! reference model (`crate::shadow`) at the same event time, and every refusal for want of
//! credits is judged against it (`crate::oracle`).

use tollgate_core::{BurnPlan, Credits, DebitId};
use tollgate_edge::{Authorized, Debited, Refused};
use tollgate_ledger::LedgerStore;
use tollgate_region::RegionStore;

use super::{credits, feature, Sim};
use crate::oracle::{
    judge, multi_region_refusal_allowed, Answer, BalanceClass, Circumstances, DecisionKind,
    OracleFigures,
};
use crate::shadow::Applied;

/// Grants listed in a false refusal's message at most.
const GRANTS_LISTED_MAX: usize = 6;
/// How many of an account's latest spends the oracle checks for one not reconciled yet.
const DEBT_UNRECONCILED_ACKS_LOOKED_AT: usize = 64;

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
        count_applied(&mut self.report.oracle, decided.kind, applied);
        let parts = if balance == done.balance_after {
            Vec::new()
        } else {
            self.balance_parts(decided, done, balance).await
        };
        let figures = &mut self.report.oracle;
        figures.balance(decided.kind, balance == done.balance_after, &parts);
    }

    /// Why the balance an edge reported after a debit differs from the model's, part by part
    /// (see [`BalanceClass`]): what the edge's reply could see of the region, read now from the
    /// region, the account's summary and the edges' leases, against what the model holds.
    async fn balance_parts(
        &self,
        decided: &Decided<'_>,
        done: &Debited,
        model: Credits,
    ) -> Vec<BalanceClass> {
        let at = self.clock.at();
        let region = self.edges[decided.edge].region;
        let id = &self.accounts[decided.account].id;
        let store = &self.stores[region];
        let (Ok(view), Ok(Some(summary))) =
            (store.view(id, at).await, store.account_summary(id).await)
        else {
            return vec![BalanceClass::RegionDown];
        };
        let lease = |e: usize| {
            let leases = self.edges[e].engine.leases();
            (
                leases.available(id, None, at).micros(),
                leases.unflushed(id).micros(),
            )
        };
        let (mine, mine_unflushed) = lease(decided.edge);
        let others_unflushed: i64 = (0..self.edges.len())
            .filter(|&e| e != decided.edge && self.edges[e].region == region)
            .map(|e| lease(e).1)
            .sum();
        let segments: i64 = view
            .segments
            .iter()
            .filter(|s| s.is_active_at(at))
            .map(|s| s.remaining.micros())
            .sum();
        let room = view.overdraft_limit.micros() - view.overdraft_used.micros();
        let debt = (summary.debt_basis.micros() - room).max(0);
        let outside = summary.outside_at(at, None).micros();
        // The region's answer, exactly: every lease less every edge's unflushed spends.
        let region_exact =
            segments + view.leased.micros() - mine_unflushed - others_unflushed + outside - debt;
        // What the reply could count without another call to the region.
        let others_leases = view.leased.micros() - mine - mine_unflushed - others_unflushed;
        let reply = done.balance_after.micros();
        let mut parts = Parts {
            classes: Vec::new(),
            left: reply - model.micros(),
        };
        if done.mode == tollgate_region::EnforcementMode::Strict {
            // The script's result has the region's pool and overdraft room, not other edges'
            // leases.
            parts.take(BalanceClass::OtherEdgesLeases, -others_leases);
            let formula = region_exact - others_leases;
            parts.take(BalanceClass::StaleSummary, reply - formula);
        } else {
            // Other edges' unflushed decisions are not seen, and the region as this edge last
            // read it may have changed since.
            parts.take(BalanceClass::OtherEdgesUnflushed, others_unflushed);
            let seen = region_exact + others_unflushed;
            parts.take(BalanceClass::RegionAsLastRead, reply - seen);
        }
        // What is left lies between the region's exact answer and the model: the debt as the
        // region sees it (from the ledger's debt basis) and the model's.
        let (ledger_balance, ledger_debt) = self
            .link
            .node()
            .ledger()
            .account(id)
            .await
            .map_or((0, 0), |l| (l.balance.micros(), l.debt.micros()));
        let model_debt = self.shadows[decided.account].book().debt().micros();
        // Client retries decided again from a lease while the first decision is charged or
        // pending elsewhere: they settle as duplicates and go back to the lease.
        let pending = mine_unflushed + others_unflushed;
        // Such decisions are on their way (not in the ledger, not parked): among the unbilled,
        // which stay few, where every acknowledgement of the history would make each decision
        // of a long one slower than the last.
        let charged_pending: i64 = self
            .unbilled
            .iter()
            .filter_map(|id| self.acks.get(id).map(|ack| (id, ack)))
            .filter(|((r, _), ack)| {
                *r == region
                    && ack.account == decided.account
                    && !ack.durable
                    && !ack.lost
                    && !ack.on_edges.is_empty()
            })
            .map(|(_, ack)| ack.cost)
            .sum();
        let retry_pending = charged_pending - pending;
        // Credits the authority counts as handed to the region whose install has not arrived
        // (lost on the way; the next recovery replays it).
        let in_flight: i64 = match self
            .link
            .node()
            .state()
            .open_installs_of(&self.region_ids[region], id, 64)
            .await
        {
            Ok(intents) => intents
                .iter()
                .filter(|i| i.spec.effective_at <= at && i.spec.expires_at.is_none_or(|e| at < e))
                .map(|i| i.spec.amount.micros())
                .sum(),
            Err(_) => 0,
        };
        // Grants issued after the summary was last published that the region does not hold
        // (the publish failed: the region was down).
        let unpublished: i64 = self.shadows[decided.account]
            .book()
            .grants()
            .filter(|g| {
                g.effective_at > summary.published_at
                    && g.is_active_at(at)
                    && !view.segments.iter().any(|s| s.grant_id == g.id)
            })
            .map(|g| g.remaining.micros())
            .sum();
        parts.take_some(&[
            (BalanceClass::DebtBasis, model_debt - debt),
            (BalanceClass::RetryPending, retry_pending),
            (BalanceClass::InstallInFlight, -in_flight),
            (BalanceClass::Unpublished, -unpublished),
        ]);
        if parts.left != 0 && self.cfg.regions > 1 {
            // Spends in other regions not reconciled yet, and their holds, are not seen here:
            // at most what those regions hold.
            if let Some(elsewhere) = self.held_elsewhere(region, decided.account).await {
                if parts.left.abs() <= elsewhere.micros() {
                    parts.classes.push(BalanceClass::OtherRegions);
                    parts.left = 0;
                }
            }
        }
        let parts_left = parts.left;
        let mut parts = parts.classes;
        if parts_left != 0 {
            parts.push(BalanceClass::Unexplained);
        }
        if self.cfg.print_trace {
            println!(
                "  balance after {}: edge {} model {} ({}); region exact {}, segments {}, leased {} (this edge {} + {} unflushed, others {} unflushed), room {}, debt basis {}, outside {}, model debt {}, ledger balance {} debt {}",
                decided.kind.name(),
                done.balance_after,
                model,
                parts.iter().map(|p| p.name()).collect::<Vec<_>>().join("+"),
                Credits::from_micros(region_exact),
                Credits::from_micros(segments),
                view.leased,
                Credits::from_micros(mine),
                Credits::from_micros(mine_unflushed),
                Credits::from_micros(others_unflushed),
                Credits::from_micros(room),
                summary.debt_basis,
                Credits::from_micros(outside),
                Credits::from_micros(model_debt),
                Credits::from_micros(ledger_balance),
                Credits::from_micros(ledger_debt),
            );
        }
        parts
    }

    /// A new hold: the model places it too, on what the region set aside, counted beyond the
    /// model or off the burn-down order as a debit is.
    pub(super) fn judge_hold(&mut self, decided: &Decided<'_>, held: &Authorized) {
        let at = self.clock.at();
        let shadow = &mut self.shadows[decided.account];
        let drawn = BurnPlan {
            draws: held.draws.clone(),
            overdraft: held.overdraft,
        };
        let applied = shadow.authorize(
            held.hold_id.clone(),
            feature(decided.feature),
            (held.priced.cost, drawn),
            at,
            held.expires_at,
        );
        count_applied(&mut self.report.oracle, decided.kind, applied);
    }

    /// A capture, release or refund the model could not apply as the edges did is counted.
    /// A debit the region applied with its answer lost, taken by the model as applied.
    pub(super) fn model_applied_unanswered(&mut self, applied: Applied) {
        count_applied(&mut self.report.oracle, DecisionKind::DebitStrict, applied);
    }

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
            partitioned_edge_lease: self.partitioned_edge_lease(region, decided.account),
            debt_unreconciled: self.debt_unreconciled(region, decided.account).await,
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
        said.push(
            match self.link.node().ledger().grants_with_credits(id, 32).await {
                Ok(grants) => format!(
                    "its open grants with credits: {}",
                    grants
                        .iter()
                        .map(|g| format!(
                            "{} {} (effective {}, expires {})",
                            g.id,
                            g.remaining,
                            g.effective_at.millis(),
                            g.expires_at
                                .map_or("never".to_owned(), |e| e.millis().to_string())
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Err(error) => format!("the ledger's grants failed: {error}"),
            },
        );
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
    /// Whether an edge of the region cut off from it holds a lease of the account: its
    /// credits are out of reach (it cannot answer a recall) until the partition heals or the
    /// lease expires.
    fn partitioned_edge_lease(&self, region: usize, account: usize) -> bool {
        let id = &self.accounts[account].id;
        self.edges
            .iter()
            .any(|e| e.region == region && e.store.is_partitioned() && e.engine.leases().holds(id))
    }

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

    /// Whether the region's overdraft room is used by a spend the ledger has not seen yet,
    /// made before the account's latest grant: in event order that grant settled the debt
    /// (see [`Cause::DebtUnreconciled`]).
    async fn debt_unreconciled(&self, region: usize, account: usize) -> bool {
        let id = &self.accounts[account].id;
        let at = self.clock.at();
        let Ok(view) = self.stores[region].view(id, at).await else {
            return false;
        };
        let Ok(snapshot) = self.link.node().ledger().account(id).await else {
            return false;
        };
        if view.overdraft_used <= snapshot.debt {
            return false;
        }
        let Some(last_grant_ms) = self.shadows[account]
            .book()
            .grants()
            .map(|g| g.effective_at.millis())
            .filter(|ms| *ms <= at.millis())
            .max()
        else {
            return false;
        };
        // The latest spends made before that grant; the unreconciled one is among the recent.
        let candidates = self
            .ack_order
            .iter()
            .rev()
            .filter_map(|key| self.acks.get(key))
            .filter(|ack| ack.account == account && !ack.lost && ack.at_ms < last_grant_ms)
            .take(DEBT_UNRECONCILED_ACKS_LOOKED_AT);
        for ack in candidates {
            let Ok(debit) = DebitId::new(ack.debit_id.clone()) else {
                continue;
            };
            let filter = tollgate_ledger::EntryFilter {
                debit: Some(debit),
                ..tollgate_ledger::EntryFilter::account(id.clone())
            };
            let page = tollgate_ledger::PageRequest {
                size: 1,
                token: None,
            };
            match self.link.node().ledger().entries(&filter, page).await {
                Ok(found) if found.items.is_empty() => return true,
                _ => {}
            }
        }
        false
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

/// A balance difference taken apart: the classes that explain parts of it and what is left.
struct Parts {
    classes: Vec<BalanceClass>,
    left: i64,
}

impl Parts {
    /// Takes the first of `candidates`' subsets (in the order of their bits) whose amounts add
    /// up to all that is left, if any: these explain a difference only as a whole.
    fn take_some(&mut self, candidates: &[(BalanceClass, i64)]) {
        if self.left == 0 {
            return;
        }
        for subset in 1u32..(1 << candidates.len()) {
            let chosen = || {
                candidates
                    .iter()
                    .enumerate()
                    .filter(move |(i, (_, amount))| subset & (1 << i) != 0 && *amount != 0)
                    .map(|(_, c)| *c)
            };
            if chosen().count() == subset.count_ones() as usize
                && chosen().map(|(_, amount)| amount).sum::<i64>() == self.left
            {
                self.classes.extend(chosen().map(|(class, _)| class));
                self.left = 0;
                return;
            }
        }
    }

    /// Takes `amount` of what is left as `class`, when both are not zero.
    fn take(&mut self, class: BalanceClass, amount: i64) {
        if amount != 0 && self.left != 0 {
            self.classes.push(class);
            self.left -= amount;
        }
    }
}

/// Counts a spend or hold the model applied: a decision, and beyond the model, off the
/// burn-down order or not as reported when it was.
fn count_applied(figures: &mut OracleFigures, kind: DecisionKind, applied: Applied) {
    figures.decision(kind);
    if !applied.allowed {
        figures.overspend(kind);
    }
    if !applied.in_order {
        figures.off_order(kind);
    }
    if !applied.as_reported {
        figures.model_disagreements += 1;
    }
}
