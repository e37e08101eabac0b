//! The embedded single node (`tollgate-authority dev`) over gRPC: a price book, an account
//! and a grant through Admin, a debit through Enforcement answered by the in-process edge (the
//! cold path allocates in process), reconciled into the SQLite ledger by the background loop,
//! and the lifecycle calls served for real.

use std::net::SocketAddr;
use std::time::Duration;

use tollgate_proto::pb;
use tonic::transport::Channel;

mod common;

use common::grpc::{ask_reflection, define_chat, price_chat, reflected_services};
use common::{request, Node, WAIT_MS as RECONCILED_WITHIN_MS};

fn timestamp(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_node_prices_decides_and_reconciles_with_nothing_else_running() {
    let node = Node::start().await;
    let channel = node.channel.clone();
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let mut edge = pb::enforcement_client::EnforcementClient::new(channel.clone());

    // Without the key nothing but health and reflection answers.
    let refused = admin
        .get_account(pb::GetAccountRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    define_chat(&mut node.admin(), "one chat message").await;
    let listed = admin
        .list_features(request(pb::ListFeaturesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.features.len(), 1);
    price_chat(&mut node.admin(), "0.5").await;
    admin
        .create_account(request(pb::CreateAccountRequest {
            idempotency_key: "a1".into(),
            account_id: "acme".into(),
            ..pb::CreateAccountRequest::default()
        }))
        .await
        .unwrap();
    admin
        .issue_grant(request(pb::IssueGrantRequest {
            idempotency_key: "g1".into(),
            account_id: "acme".into(),
            grant_id: "welcome".into(),
            amount: "100".into(),
            source: pb::GrantSource::Promo.into(),
            ..pb::IssueGrantRequest::default()
        }))
        .await
        .unwrap();

    let debited = edge
        .debit(request(pb::DebitRequest {
            idempotency_key: "d1".into(),
            account_id: "acme".into(),
            usage: Some(pb::Usage {
                feature: "chat".into(),
                amount: Some(pb::usage::Amount::Quantity("3".into())),
            }),
            ..pb::DebitRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(debited.outcome, Some(pb::debit_reply::Outcome::Debited(_))),
        "{debited:?}"
    );

    // The background loop reconciles the debit into the ledger.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let balance = loop {
        let reply = admin
            .get_balance(request(pb::AdminGetBalanceRequest {
                account_id: "acme".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        let balance = reply.balance.unwrap().balance;
        if balance != "100" || tokio::time::Instant::now() > deadline {
            break balance;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(balance, "98.5");

    let usage = admin
        .get_usage_breakdown(request(pb::GetUsageBreakdownRequest {
            account_id: "acme".into(),
            group_by: vec![pb::UsageDimension::Feature.into()],
            ..pb::GetUsageBreakdownRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.rows.len(), 1);
    assert_eq!(usage.rows[0].feature, "chat");
    assert_eq!(usage.rows[0].credits, "1.5");

    let ranked = admin
        .rank_accounts(request(pb::RankAccountsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ranked.by_burn.len(), 1);
    assert_eq!(ranked.by_burn[0].account_id, "acme");
    assert_eq!(ranked.by_burn[0].burned, "1.5");
    let refused = admin
        .rank_accounts(request(pb::RankAccountsRequest {
            limit: 100_000,
            ..pb::RankAccountsRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("limit"), "{}", refused.message());

    let metrics = http_get(node.http).await;
    assert!(metrics.contains("tollgate"), "{metrics}");

    node.stop().await;
}

/// A plain HTTP GET of /metrics over a TCP socket (no client library needed for one line).
async fn http_get(address: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_settings_change_over_the_wire_and_bad_ones_change_nothing() {
    let node = Node::start().await;
    let mut admin = pb::admin_client::AdminClient::new(node.channel.clone());
    let mut edge = pb::enforcement_client::EnforcementClient::new(node.channel.clone());
    define_chat_and_pro(&mut admin).await;
    admin
        .publish_price_book_version(request(pb::PublishPriceBookVersionRequest {
            idempotency_key: "p1".into(),
            version: Some(pb::PriceBookVersion {
                version: 1,
                effective_from: Some(timestamp(0)),
                default_rates: Some(pb::RateTable {
                    rates: [("chat".to_owned(), "1".to_owned())].into(),
                }),
                plan_rates: [(
                    "pro".to_owned(),
                    pb::RateTable {
                        rates: [("chat".to_owned(), "0.25".to_owned())].into(),
                    },
                )]
                .into(),
                ..pb::PriceBookVersion::default()
            }),
        }))
        .await
        .unwrap();
    let created = admin
        .create_account(request(pb::CreateAccountRequest {
            idempotency_key: "a1".into(),
            account_id: "acme".into(),
            ..pb::CreateAccountRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    let defaults = created.settings.unwrap();
    assert_eq!(defaults.mode, pb::EnforcementMode::Strict as i32);
    assert!(defaults.top_up.is_none());

    // Every kind of bad input is refused, naming its field, and changes nothing.
    let good = pb::UpdateAccountRequest {
        idempotency_key: "u1".into(),
        account_id: "acme".into(),
        overdraft_limit: Some("5".into()),
        metadata: [("tier".to_owned(), "gold".to_owned())].into(),
        low_balance: Some("2".into()),
        top_up: Some(pb::TopUpSettings {
            hook_url: "http://127.0.0.1:9/top-up".into(),
            secret: "a-secret-of-some-length".into(),
            threshold: "1".into(),
            amount: "10".into(),
            monthly_cap: "100".into(),
            has_secret: false,
        }),
        plan: Some("pro".into()),
        mode: pb::EnforcementMode::Cached.into(),
        ..pb::UpdateAccountRequest::default()
    };
    type Spoil = fn(&mut pb::UpdateAccountRequest);
    let spoiled: [(&str, Spoil); 9] = [
        ("overdraft_limit", |r| r.overdraft_limit = Some("-1".into())),
        ("overdraft_limit", |r| {
            r.overdraft_limit = Some("1.0000001".into())
        }),
        ("low_balance", |r| r.low_balance = Some("lots".into())),
        ("top_up.hook_url", |r| {
            r.top_up.as_mut().unwrap().hook_url = "https://x/".into()
        }),
        ("top_up.secret", |r| {
            r.top_up.as_mut().unwrap().secret = "short".into()
        }),
        ("top_up.monthly_cap", |r| {
            r.top_up.as_mut().unwrap().monthly_cap = "5".into()
        }),
        ("clear_top_up", |r| r.clear_top_up = true),
        ("plan", |r| r.plan = Some("not a plan id!".into())),
        ("mode", |r| r.mode = 9),
    ];
    for (field, spoil) in spoiled {
        let mut bad = good.clone();
        bad.idempotency_key = format!("bad-{field}");
        spoil(&mut bad);
        let refused = admin.update_account(request(bad)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            refused.message().contains(field),
            "{field}: {}",
            refused.message()
        );
    }
    let unchanged = admin
        .get_account(request(pb::GetAccountRequest {
            account_id: "acme".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(unchanged.overdraft_limit, "0");
    assert!(unchanged.metadata.is_empty());
    assert_eq!(unchanged.settings.unwrap(), defaults);
    let unknown = admin
        .update_account(request(pb::UpdateAccountRequest {
            account_id: "nobody".into(),
            ..good.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The good update: ledger terms and settings together; the secret never comes back.
    let updated = admin
        .update_account(request(good.clone()))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(updated.overdraft_limit, "5");
    assert_eq!(updated.metadata.get("tier").unwrap(), "gold");
    let settings = updated.settings.unwrap();
    assert_eq!(settings.low_balance, "2");
    assert_eq!(settings.plan, "pro");
    assert_eq!(settings.mode, pb::EnforcementMode::Cached as i32);
    let top_up = settings.top_up.unwrap();
    assert!(top_up.secret.is_empty() && top_up.has_secret);
    assert_eq!(top_up.amount, "10");
    // A replay answers the same.
    let replay = admin
        .update_account(request(good.clone()))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(replay.overdraft_limit, "5");

    // The plan reaches the edge: Quote prices with the plan's rate once the summary lands.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let quoted = loop {
        let quote = edge
            .quote(request(pb::QuoteRequest {
                account_id: "acme".into(),
                usage: Some(pb::Usage {
                    feature: "chat".into(),
                    amount: Some(pb::usage::Amount::Quantity("4".into())),
                }),
            }))
            .await
            .unwrap()
            .into_inner();
        let priced = quote.priced.unwrap();
        if priced.cost == "1" || tokio::time::Instant::now() > deadline {
            break priced;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(quoted.cost, "1");
    assert_eq!(quoted.price_rule, pb::PriceRule::Plan as i32);

    // The overdraft limit reaches the region: with no grant at all, 4 x 0.25 = 1 credit
    // is spent into the overdraft (5 allowed), and the ledger records the debt.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    loop {
        let debited = edge
            .debit(request(pb::DebitRequest {
                idempotency_key: "d-overdraft".into(),
                account_id: "acme".into(),
                usage: Some(pb::Usage {
                    feature: "chat".into(),
                    amount: Some(pb::usage::Amount::Quantity("4".into())),
                }),
                mode: pb::EnforcementMode::Strict.into(),
                ..pb::DebitRequest::default()
            }))
            .await
            .unwrap()
            .into_inner();
        match debited.outcome {
            Some(pb::debit_reply::Outcome::Debited(_)) => break,
            other if tokio::time::Instant::now() > deadline => panic!("{other:?}"),
            // Refused before the new room arrives: the key is not recorded for a refusal
            // that moved nothing, so the same key can try again.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let balance = loop {
        let balance = admin
            .get_balance(request(pb::AdminGetBalanceRequest {
                account_id: "acme".into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap();
        if balance.balance == "-1" || tokio::time::Instant::now() > deadline {
            break balance;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(balance.balance, "-1");

    // Clearing: the top-up goes, the plan goes, unset fields stay.
    let cleared = admin
        .update_account(request(pb::UpdateAccountRequest {
            idempotency_key: "u2".into(),
            account_id: "acme".into(),
            clear_top_up: true,
            plan: Some(String::new()),
            ..pb::UpdateAccountRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    let settings = cleared.settings.unwrap();
    assert!(settings.top_up.is_none());
    assert!(settings.plan.is_empty());
    assert_eq!(settings.low_balance, "2");
    assert_eq!(cleared.overdraft_limit, "5");
    node.stop().await;
}

type Admin = pb::admin_client::AdminClient<Channel>;

/// The feature `chat` and a plan `pro` with one monthly grant of 300 credits.
async fn define_chat_and_pro(admin: &mut Admin) {
    admin
        .define_feature(request(pb::DefineFeatureRequest {
            idempotency_key: "f-chat".into(),
            feature: Some(pb::Feature {
                feature: "chat".into(),
                unit: "message".into(),
                description: String::new(),
            }),
        }))
        .await
        .unwrap();
    admin
        .define_plan(request(pb::DefinePlanRequest {
            idempotency_key: "plan-pro".into(),
            plan: Some(pb::Plan {
                plan_id: "pro".into(),
                description: "the pro plan".into(),
                tier: 2,
                grants: vec![pb::PlanGrant {
                    key: "monthly".into(),
                    amount: "300".into(),
                    period_unit: pb::PeriodUnit::Month.into(),
                    period_count: 1,
                    rollover: None,
                    priority: 10,
                    scope: None,
                }],
            }),
        }))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogues_plans_and_contracts_over_the_wire_with_every_problem_named() {
    let node = Node::start().await;
    let mut admin = pb::admin_client::AdminClient::new(node.channel.clone());
    let edge = pb::enforcement_client::EnforcementClient::new(node.channel.clone());
    define_chat_and_pro(&mut admin).await;

    // A bad book: every problem is named in one refusal, and nothing is published.
    let rates = |pairs: &[(&str, &str)]| pb::RateTable {
        rates: pairs
            .iter()
            .map(|(f, r)| ((*f).to_owned(), (*r).to_owned()))
            .collect(),
    };
    let refused = admin
        .publish_price_book_version(request(pb::PublishPriceBookVersionRequest {
            idempotency_key: "bad".into(),
            version: Some(pb::PriceBookVersion {
                version: 1,
                effective_from: Some(timestamp(0)),
                default_rates: Some(rates(&[("chat", "-1"), ("image", "2")])),
                plan_rates: [
                    ("pro".to_owned(), rates(&[("chat", "0.1234567890123")])),
                    ("gold".to_owned(), rates(&[("chat", "1")])),
                ]
                .into(),
                ..pb::PriceBookVersion::default()
            }),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    for problem in [
        "version.default_rates.rates[chat]",
        "version.default_rates[image]: unknown feature",
        "version.plan_rates[pro].rates[chat]",
        "version.plan_rates[gold]: unknown plan",
    ] {
        assert!(
            refused.message().contains(problem),
            "{problem} in {}",
            refused.message()
        );
    }
    let versions = admin
        .list_price_book_versions(request(pb::ListPriceBookVersionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(versions.versions.is_empty());

    // A good book: chat at 1, 0.5 on pro.
    let publish = |version: u64, default: &str, pro: &str| pb::PublishPriceBookVersionRequest {
        idempotency_key: format!("p{version}"),
        version: Some(pb::PriceBookVersion {
            version,
            effective_from: Some(timestamp(0)),
            default_rates: Some(rates(&[("chat", default)])),
            plan_rates: [("pro".to_owned(), rates(&[("chat", pro)]))].into(),
            ..pb::PriceBookVersion::default()
        }),
    };
    admin
        .publish_price_book_version(request(publish(1, "1", "0.5")))
        .await
        .unwrap();
    for id in ["acme", "locked"] {
        admin
            .create_account(request(pb::CreateAccountRequest {
                idempotency_key: format!("create-{id}"),
                account_id: id.into(),
                ..pb::CreateAccountRequest::default()
            }))
            .await
            .unwrap();
    }

    // Contracts: overlapping periods and a missing version are refused together.
    let contract = |from: i64, until: Option<i64>| pb::Contract {
        effective_from: Some(timestamp(from)),
        effective_until: until.map(timestamp),
        ..pb::Contract::default()
    };
    let refused = admin
        .set_contracts(request(pb::SetContractsRequest {
            idempotency_key: "c-bad".into(),
            account_id: "locked".into(),
            contracts: vec![
                contract(0, Some(2_000_000_000)),
                pb::Contract {
                    locked_version: Some(9),
                    ..contract(1_000_000_000, None)
                },
            ],
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("overlaps contracts[1]"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("version 9 does not exist"),
        "{}",
        refused.message()
    );
    admin
        .set_contracts(request(pb::SetContractsRequest {
            idempotency_key: "c-good".into(),
            account_id: "locked".into(),
            contracts: vec![pb::Contract {
                locked_version: Some(1),
                no_expiry: true,
                ..contract(0, None)
            }],
        }))
        .await
        .unwrap();
    // Its no-expiry clause: a grant issued with an expiry is stored without one.
    admin
        .issue_grant(request(pb::IssueGrantRequest {
            idempotency_key: "g-locked".into(),
            account_id: "locked".into(),
            grant_id: "bonus".into(),
            amount: "10".into(),
            source: pb::GrantSource::Promo.into(),
            expires_at: Some(timestamp(4_000_000_000)),
            ..pb::IssueGrantRequest::default()
        }))
        .await
        .unwrap();
    let grants = admin
        .list_grants(request(pb::ListGrantsRequest {
            account_id: "locked".into(),
            ..pb::ListGrantsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grants.grants.len(), 1);
    assert!(
        grants.grants[0].expires_at.is_none(),
        "{:?}",
        grants.grants[0]
    );
    let read = admin
        .get_contracts(request(pb::GetContractsRequest {
            account_id: "locked".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.contracts.len(), 1);
    assert_eq!(read.contracts[0].locked_version, Some(1));
    assert!(read.contracts[0].no_expiry);

    // acme joins pro (grants come from the lifecycle; the plan's price applies at once).
    let changed = admin
        .change_plan(request(pb::ChangePlanRequest {
            idempotency_key: "join-pro".into(),
            account_id: "acme".into(),
            plan_id: "pro".into(),
            ..pb::ChangePlanRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.schedule_ids.len(), 1);
    let unknown = admin
        .change_plan(request(pb::ChangePlanRequest {
            idempotency_key: "join-gold".into(),
            account_id: "acme".into(),
            plan_id: "gold".into(),
            ..pb::ChangePlanRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // Version 2 doubles the prices. Quotes (once summaries and the book land on the edge):
    // acme on pro at version 2's 1 per message, the locked account still at version 1's 1.
    admin
        .publish_price_book_version(request(publish(2, "2", "1")))
        .await
        .unwrap();
    let quote = |account: &str| {
        let request = request(pb::QuoteRequest {
            account_id: account.into(),
            usage: Some(pb::Usage {
                feature: "chat".into(),
                amount: Some(pb::usage::Amount::Quantity("3".into())),
            }),
        });
        let mut edge = edge.clone();
        async move {
            edge.quote(request)
                .await
                .unwrap()
                .into_inner()
                .priced
                .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(RECONCILED_WITHIN_MS);
    let (pro, locked) = loop {
        let pro = quote("acme").await;
        let locked = quote("locked").await;
        let settled = pro.price_version == 2 && pro.price_rule == pb::PriceRule::Plan as i32;
        if settled || tokio::time::Instant::now() > deadline {
            break (pro, locked);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((pro.cost.as_str(), pro.price_version), ("3", 2));
    assert_eq!(pro.price_rule, pb::PriceRule::Plan as i32);
    assert_eq!((locked.cost.as_str(), locked.price_version), ("3", 1));
    let plans = admin
        .list_plans(request(pb::ListPlansRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plans.plans.len(), 1);
    assert_eq!(plans.plans[0].grants[0].amount, "300");
    drop(edge);
    node.stop().await;
}

/// Reflection lists every service the embedded node answers, with `v1` and `v1alpha`, and
/// describes Envoy's rate-limit service down to the files it imports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_every_service_the_embedded_node_answers() {
    use tonic_reflection::pb::{v1, v1alpha};
    let node = Node::start().await;
    let ask_v1 = |message| ask_reflection(node.channel.clone(), message);
    let listed_v1 = reflected_services(node.channel.clone()).await;

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let reply =
        v1alpha::server_reflection_client::ServerReflectionClient::new(node.channel.clone())
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .expect("one reply");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("a v1alpha service list: {reply:?}");
    };
    let listed_v1alpha: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for listed in [&listed_v1, &listed_v1alpha] {
        for service in [
            "tollgate.v1.Enforcement",
            "tollgate.v1.Admin",
            "tollgate.v1.Coordination",
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                listed.iter().any(|name| name == service),
                "{service}: {listed:?}"
            );
        }
    }

    // A client describing the service fetches its file, then each import by name.
    let file_names = |reply: v1::ServerReflectionResponse| match reply.message_response {
        Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) => {
            files
                .file_descriptor_proto
                .iter()
                .map(|bytes| {
                    <prost_types::FileDescriptorProto as prost::Message>::decode(bytes.as_slice())
                        .unwrap()
                })
                .collect::<Vec<_>>()
        }
        other => panic!("file descriptors: {other:?}"),
    };
    let files = file_names(
        ask_v1(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "envoy.service.ratelimit.v3.RateLimitService".into(),
            ),
        )
        .await,
    );
    let rls = files
        .iter()
        .find(|file| file.name() == "envoy/service/ratelimit/v3/rls.proto")
        .expect("the service's own file");
    for import in &rls.dependency {
        let found = file_names(
            ask_v1(v1::server_reflection_request::MessageRequest::FileByFilename(import.clone()))
                .await,
        );
        assert!(
            found.iter().any(|file| file.name() == import),
            "{import} is described"
        );
    }
    node.stop().await;
}
