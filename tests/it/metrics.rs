//! The metrics catalogue (`docs/metrics.md`) against a real scrape: a service on
//! PostgreSQL, Redis and Kafka serves REST, gRPC, a deprecated route, Idempotency-Key
//! replays, relays its events and consumes a payment; then every exposed metric must be in
//! the catalogue with its type, every catalogued metric must be exposed (bar those only
//! faults produce), and `promtool check metrics` must accept the scrape. The alert rules and
//! the dashboard may only read catalogued metrics, and every alert is named in it.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use orders_service::pb::orders::v1::GetOrderRequest;
use serde_json::{Value, json};

use crate::{
    inbox::{Topics, event, produce},
    kafka,
    support::{TestApp, eventually, valid_order},
};

/// Catalogued metrics that only a fault makes appear (a failed publish, an open breaker,
/// a shed request, …); the fault tests exercise them.
const ONLY_ON_FAULTS: &[&str] = &[
    "outbox_publish_errors_total",
    "outbox_producer_rebuilds_total",
    "inbox_retries_total",
    "inbox_dispatch_failures_total",
    "inbox_dlq_producer_rebuilds_total",
    "inbox_consumer_lag",
    "resilience_breaker_transitions_total",
    "resilience_calls_refused_total",
    "resilience_timeouts_total",
    "resilience_retries_total",
    "inbound_shed_total",
];

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path)
}

/// `docs/metrics.md`: metric → (type, alerts named).
fn catalogue() -> BTreeMap<String, (String, String)> {
    let row =
        regex::Regex::new(r"(?m)^\| `([a-z_:]+)` \| (counter|gauge|histogram) \|[^|]*\|[^|]*\|([^|]*)\|$")
            .expect("regex");
    row.captures_iter(&repo_file("docs/metrics.md"))
        .map(|c| (c[1].to_owned(), (c[2].to_owned(), c[3].trim().to_owned())))
        .collect()
}

/// The metric families of a scrape: name → type.
fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name type");
            (name.to_owned(), kind.to_owned())
        })
        .collect()
}

/// The metric names a PromQL text reads (histogram series mapped to their family).
fn metrics_read(promql: &str, catalogue: &BTreeMap<String, (String, String)>) -> Vec<String> {
    let prefixes = [
        "http_",
        "grpc_",
        "outbox_",
        "inbox_",
        "idempotency_",
        "redis_",
        "resilience_",
        "db_pool_",
        "inbound_",
        "deprecated_",
        "orders_service_",
    ];
    let token = regex::Regex::new(r"[a-z_][a-z0-9_]*").expect("regex");
    let mut names: Vec<String> = token
        .find_iter(promql)
        .map(|m| m.as_str())
        .filter(|t| prefixes.iter().any(|p| t.starts_with(p)))
        .map(|t| {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| t.strip_suffix(s));
            match family {
                Some(f) if catalogue.get(f).is_some_and(|(kind, _)| kind == "histogram") => f.to_owned(),
                _ => t.to_owned(),
            }
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn every_exposed_metric_is_catalogued_typed_and_passes_promtool() {
    let topics = Topics::create().await;
    let orders_topic = kafka::fresh_topic().await;
    let (brokers, redis) = (
        kafka::brokers(),
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
    );
    let prefix = format!("test-{}:", uuid::Uuid::now_v7().simple());
    let app = TestApp::spawn_configured(&[
        ("APP_KAFKA__BROKERS", &brokers),
        ("APP_EVENTS__TOPIC", &orders_topic),
        ("APP_KAFKA__GROUP_ID", &topics.group),
        ("APP_INBOX__PAYMENTS_TOPIC", &topics.payments),
        ("APP_INBOX__CUSTOMERS_TOPIC", &topics.customers),
        ("APP_REDIS__URL", &redis),
        ("APP_REDIS__KEY_PREFIX", &prefix),
    ])
    .await;

    // REST: a create and its replay, a read, a page, a cancel, the deprecated status route.
    let created = app.create_with_key(&valid_order(), "metrics-1").await;
    assert_eq!(created.status(), 201);
    let order: Value = created.json().await.expect("json");
    assert_eq!(app.create_with_key(&valid_order(), "metrics-1").await.status(), 201, "replayed");
    let id = order["id"].as_str().expect("id").to_owned();
    assert_eq!(app.get(&format!("/v1/orders/{id}")).await.status(), 200);
    assert_eq!(app.get(&format!("/v1/orders/{id}/status")).await.status(), 200);
    assert_eq!(app.get("/v1/orders?page_size=1").await.status(), 200);
    // gRPC.
    app.grpc().await.get_order(GetOrderRequest { id: id.clone() }).await.expect("GetOrder");
    // The inbox: a second order is paid by a payment event.
    let paid: Value = app.create_ok().await;
    let paid_id = paid["id"].as_str().expect("id").to_owned();
    let data = json!({"paymentId": "pay-metrics", "orderId": paid_id, "amountMinor": paid["total_minor"].to_string(),
                      "currency": paid["currency"]});
    produce(vec![event(
        &topics.payments,
        "payments.events.v1.PaymentCaptured",
        "pay-metrics-1",
        &paid_id,
        data,
    )])
    .await;
    assert_eq!(app.post_empty(&format!("/v1/orders/{id}/cancel")).await.status(), 200);
    eventually(Duration::from_secs(30), "the payment applied and the events relayed", || async {
        let scrape = app.metrics().await;
        scrape
            .contains(&format!("inbox_messages_total{{result=\"applied\",topic=\"{}\"}} 1", topics.payments))
            && scrape.lines().any(|l| l.starts_with("outbox_published_total ") && !l.ends_with(" 0"))
    })
    .await;

    let scrape = app.metrics().await;
    let exposed = families(&scrape);
    let catalogue = catalogue();
    for (name, kind) in &exposed {
        let documented = catalogue.get(name).map(|(k, _)| k.as_str());
        assert_eq!(
            documented,
            Some(kind.as_str()),
            "{name} ({kind}) is exposed but not in docs/metrics.md as a {kind}"
        );
    }
    for name in catalogue.keys() {
        assert!(
            exposed.contains_key(name) || ONLY_ON_FAULTS.contains(&name.as_str()),
            "docs/metrics.md lists {name}, which the exercised service never exposed"
        );
    }
    for name in ONLY_ON_FAULTS {
        assert!(catalogue.contains_key(*name), "{name} is not catalogued");
    }
    assert!(
        scrape.contains("orders_service_build_info{commit="),
        "build info: {}",
        scrape.lines().filter(|l| l.contains("build_info")).collect::<Vec<_>>().join("\n")
    );
    assert!(scrape.contains("db_pool_max_connections{pool=\"api\"} 5"), "the api pool's size");

    // promtool's lint: naming, units, help texts, counters ending in _total.
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {promtool} (set PROMTOOL; scripts/tools.sh installs it): {e}")
        });
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), scrape.as_bytes()).expect("write");
    let output = child.wait_with_output().expect("promtool");
    let said =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool check metrics:\n{said}");
}

#[test]
fn alerts_and_the_dashboard_read_only_catalogued_metrics() {
    let catalogue = catalogue();
    let alerts = repo_file("helm/orders-service/files/alerts.yaml");
    let dashboard: Value =
        serde_json::from_str(&repo_file("helm/orders-service/files/dashboard.json")).expect("json");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(exprs.len() >= 20, "the dashboard has its panels");
    for (source, text) in [("alerts.yaml", alerts.clone()), ("dashboard.json", exprs.join("\n"))] {
        for name in metrics_read(&text, &catalogue) {
            assert!(
                catalogue.contains_key(&name),
                "{source} reads {name}, which docs/metrics.md does not list"
            );
        }
    }
    // Every alert is named in the catalogue next to the metrics it reads, and vice versa.
    let alert = regex::Regex::new(r"- alert: (\w+)").expect("regex");
    let defined: Vec<&str> = alert.captures_iter(&alerts).map(|c| c.get(1).expect("name").as_str()).collect();
    let named: String = catalogue.values().map(|(_, a)| a.as_str()).collect::<Vec<_>>().join(",");
    for name in &defined {
        assert!(named.contains(name), "docs/metrics.md names no metric for the alert {name}");
    }
    for name in named.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        assert!(defined.contains(&name), "docs/metrics.md names the alert {name}, which alerts.yaml lacks");
    }
}
