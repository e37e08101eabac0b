// Period closing and the cross-account queries the authority's scheduler and reports use.
// `include!`d at the end of `sql_body.rs`, so it shares its imports, `Db` and `sql()`.

const DEBIT_COLUMNS: &str = "account_id, debit_id, feature, actor, region, \
    tg_ms(event_at) AS event_at, tg_micros(amount) AS amount, tg_micros(overdraft) AS overdraft, \
    tg_micros(refunded_overdraft) AS refunded_overdraft, draws, quantity, unit, rate";

/// Prefix of the keyset tokens of cross-account queries: `k1.<account>|<id or seq>`.
const KEYSET_TOKEN_PREFIX: &str = "k1.";

fn keyset_token(account: &AccountId, id: &str) -> String {
    format!("{KEYSET_TOKEN_PREFIX}{account}|{id}")
}

/// The (account, id) after which a cross-account page starts (empty strings for the first).
fn keyset_after(page: &PageRequest) -> Result<(String, String), LedgerError> {
    let Some(token) = page.token.as_deref().filter(|t| !t.is_empty()) else {
        return Ok((String::new(), String::new()));
    };
    token
        .strip_prefix(KEYSET_TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('|'))
        .map(|(account, id)| (account.to_owned(), id.to_owned()))
        .ok_or_else(|| LedgerError::invalid("page_token", "not a token this query returned"))
}

fn debit_row_of(row: &DbRow) -> Result<DebitRow, LedgerError> {
    let record = debit_record_of(row)?;
    let refunded = record.refunded();
    let (quantity, unit, rate) = get_pricing(row)?;
    Ok(DebitRow {
        account: parse_id("account_id", get_text(row, "account_id")?)?,
        debit_id: parse_id("debit_id", get_text(row, "debit_id")?)?,
        feature: parse_id("feature", get_text(row, "feature")?)?,
        actor: parse_opt_id(row, "actor")?,
        region: parse_opt_id(row, "region")?,
        at: record.at,
        amount: get_credits(row, "amount")?,
        refunded,
        overdraft: record.plan.overdraft,
        draws: record.plan.draws,
        quantity,
        unit,
        rate,
    })
}

impl Store {
    async fn close_period_impl(
        &self,
        command: ClosePeriod,
        now: Timestamp,
    ) -> Result<Outcome, LedgerError> {
        const OPERATION: &str = "close_period";
        let fingerprint = apply::fingerprint(OPERATION, &command)?;
        let period_grant = command
            .schedule
            .grant_id(command.index)
            .ok_or_else(|| LedgerError::invalid("index", "outside the schedule's range"))?;
        let rollover_grant = GrantId::new(format!("{period_grant}.rollover"))
            .map_err(|e| LedgerError::invalid("schedule_id", e))?;
        let load = Load {
            // The rollover grant's id must be seen even if closed, so it is never reused.
            grants: vec![period_grant, rollover_grant.clone()],
            debit: None,
            with_credits: false,
        };
        let key = command.key.as_str().to_owned();
        let account = command.account.clone();
        self.mutate(&key, &account, OPERATION, fingerprint, now, load, |book, _| {
            let movements = match book.close_period(&command.schedule, command.index, now) {
                Ok(Ok(movements)) => movements,
                Ok(Err(schedule)) => return Err(LedgerError::invalid("schedule", schedule)),
                Err(error) => return Ok(Err(classify(&command.account, error)?)),
            };
            let created = book.grant(&rollover_grant).is_some().then_some(rollover_grant);
            Ok(Ok(Done {
                movements,
                context: admin_context(command.key.as_str(), command.memo.as_str()),
                grant_id: created,
                grant_metadata: Metadata::default(),
            }))
        })
        .await
    }

    async fn list_accounts_impl(
        &self,
        page: PageRequest,
    ) -> Result<Page<AccountSnapshot>, LedgerError> {
        let size = apply::page_size(&page)?;
        let (after, _) = keyset_after(&page)?;
        let text = sql(&format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id > $1 \
             ORDER BY account_id LIMIT $2"
        ));
        let rows = sqlx::query(&text)
            .bind(after)
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(snapshot_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > size as usize;
        items.truncate(size as usize);
        let next_token = more
            .then(|| items.last().map(|a| keyset_token(&a.account, "")))
            .flatten();
        Ok(Page { items, next_token })
    }

    async fn grants_expiring_impl(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> Result<Vec<GrantRecord>, LedgerError> {
        let size = apply::page_size(&PageRequest {
            size: limit,
            token: None,
        })?;
        let text = sql(&format!(
            "SELECT {GRANT_COLUMNS} FROM grants WHERE state = 'open' \
             AND expires_at IS NOT NULL AND expires_at <= tg_time($1) \
             ORDER BY expires_at, account_id, grant_id LIMIT $2"
        ));
        let rows = sqlx::query(&text)
            .bind(before.millis())
            .bind(i64::from(size))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(grant_record_of).collect()
    }

    async fn debits_impl(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<DebitRow>, LedgerError> {
        let size = apply::page_size(&page)?;
        let (after_account, after_id) = keyset_after(&page)?;
        let text = sql(&format!(
            "SELECT {DEBIT_COLUMNS} FROM debits \
             WHERE ($1 = '' OR account_id = $1) AND event_at >= tg_time($2) \
             AND event_at < tg_time($3) AND (account_id, debit_id) > ($4, $5) \
             ORDER BY account_id, debit_id LIMIT $6"
        ));
        let rows = sqlx::query(&text)
            .bind(query.account.as_ref().map_or("", AccountId::as_str))
            .bind(query.from.millis())
            .bind(query.until.millis())
            .bind(after_account)
            .bind(after_id)
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(debit_row_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > size as usize;
        items.truncate(size as usize);
        let next_token = more
            .then(|| {
                items
                    .last()
                    .map(|d| keyset_token(&d.account, d.debit_id.as_str()))
            })
            .flatten();
        Ok(Page { items, next_token })
    }

    async fn entries_between_impl(
        &self,
        query: &DebitQuery,
        page: PageRequest,
    ) -> Result<Page<Entry>, LedgerError> {
        let size = apply::page_size(&page)?;
        let (after_account, after_seq) = keyset_after(&page)?;
        let after_seq: i64 = if after_seq.is_empty() {
            0
        } else {
            after_seq
                .parse()
                .map_err(|_| LedgerError::invalid("page_token", "not a token this query returned"))?
        };
        let text = sql(&format!(
            "SELECT {ENTRY_COLUMNS} FROM ledger_entries \
             WHERE ($1 = '' OR account_id = $1) AND event_at >= tg_time($2) \
             AND event_at < tg_time($3) AND (account_id, seq) > ($4, $5) \
             ORDER BY account_id, seq LIMIT $6"
        ));
        let rows = sqlx::query(&text)
            .bind(query.account.as_ref().map_or("", AccountId::as_str))
            .bind(query.from.millis())
            .bind(query.until.millis())
            .bind(after_account)
            .bind(after_seq)
            .bind(i64::from(size) + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(entry_of).collect::<Result<Vec<_>, _>>()?;
        let more = items.len() > size as usize;
        items.truncate(size as usize);
        let next_token = more
            .then(|| {
                items
                    .last()
                    .map(|e| keyset_token(&e.account, &e.seq.to_string()))
            })
            .flatten();
        Ok(Page { items, next_token })
    }
}
