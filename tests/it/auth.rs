//! JWT verification of API callers against real tokens: keys generated in the test (ES256
//! and EdDSA with ring, RS256 with openssl), signed with `jsonwebtoken`, served from a JWKS
//! file and from a local HTTP endpoint that rotates its keys. REST answers 401 / 403
//! problems with RFC 6750 challenges, gRPC UNAUTHENTICATED / PERMISSION_DENIED; probes
//! stay open; the verified subject scopes Idempotency-Keys.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orders_service::pb::orders::v1::{CreateOrderRequest, GetOrderRequest, LineItem};
use ring::signature::KeyPair;
use serde_json::{Value, json};

use crate::support::{TestApp, valid_order};

pub(crate) const ISSUER: &str = "https://id.example.com";
pub(crate) const AUDIENCE: &str = "orders-service";

/// A signing key and its public JWK.
pub(crate) struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) fn es256(kid: &str) -> Key {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING as P256, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&P256, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&P256, pkcs8.as_ref(), &rng).expect("pair");
    let point = pair.public_key().as_ref(); // 0x04 || x || y
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                     "x": b64(&point[1..33]), "y": b64(&point[33..65])});
    Key { kid: kid.into(), alg: Algorithm::ES256, encoding: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk }
}

fn eddsa(kid: &str) -> Key {
    use ring::signature::Ed25519KeyPair;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
    let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
                     "x": b64(pair.public_key().as_ref())});
    Key { kid: kid.into(), alg: Algorithm::EdDSA, encoding: EncodingKey::from_ed_der(pkcs8.as_ref()), jwk }
}

fn rs256(kid: &str) -> Key {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("key.pem");
    let run = |args: &[&str]| {
        let output = std::process::Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    run(&["genrsa", "-out", pem.to_str().expect("path"), "2048"]);
    let modulus = String::from_utf8(run(&["rsa", "-in", pem.to_str().expect("path"), "-noout", "-modulus"]))
        .expect("utf-8");
    let hex = modulus.trim().strip_prefix("Modulus=").expect("Modulus=");
    let n: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
    let jwk = json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64(&n), "e": "AQAB"});
    let encoding = EncodingKey::from_rsa_pem(&std::fs::read(&pem).expect("pem")).expect("rsa key");
    Key { kid: kid.into(), alg: Algorithm::RS256, encoding, jwk }
}

fn now() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()).expect("secs")
}

/// A token from `key` for `sub` with `scope`; `tweak` edits the claims first.
pub(crate) fn token(key: &Key, sub: &str, scope: &str, tweak: impl FnOnce(&mut Value)) -> String {
    let mut claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
                            "iat": now(), "nbf": now() - 5, "exp": now() + 300});
    tweak(&mut claims);
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &key.encoding).expect("signed")
}

pub(crate) fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

async fn app_with_jwks_file(keys: &[&Key]) -> (TestApp, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks(keys)).expect("write jwks");
    let app = TestApp::spawn_configured(&[
        ("APP_AUTH__ENABLED", "true"),
        ("APP_AUTH__JWKS_FILE", file.to_str().expect("path")),
        ("APP_AUTH__ISSUER", ISSUER),
        ("APP_AUTH__AUDIENCE", AUDIENCE),
    ])
    .await;
    (app, dir)
}

pub(crate) async fn create(app: &TestApp, bearer: Option<&str>, key: &str) -> reqwest::Response {
    let mut request = app
        .client
        .post(format!("{}/v1/orders", app.http))
        .header("idempotency-key", key)
        .json(&valid_order());
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

async fn refused(response: reqwest::Response, status: u16, challenge: &str, detail: &str) {
    assert_eq!(response.status(), status);
    let header = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(header.contains(challenge), "WWW-Authenticate {header:?} lacks {challenge:?}");
    let problem: Value = response.json().await.expect("problem");
    let slug = if status == 401 { "unauthenticated" } else { "forbidden" };
    assert_eq!(problem["type"], format!("urn:problem-type:orders:{slug}"));
    assert_eq!(problem["detail"], detail);
}

#[tokio::test]
async fn rest_callers_need_a_valid_token_with_the_operations_scope() {
    let (signer, stranger) = (es256("k1"), es256("k1")); // same kid, another key
    let (app, _dir) = app_with_jwks_file(&[&signer]).await;
    let write = |tweak: fn(&mut Value)| token(&signer, "svc-a", "orders:read orders:write", tweak);

    refused(
        create(&app, None, "a1").await,
        401,
        r#"Bearer realm="orders-service""#,
        "a bearer token is required",
    )
    .await;
    let forged = token(&stranger, "svc-a", "orders:write", |_| {});
    let invalid = r#"error="invalid_token""#;
    refused(create(&app, Some(&forged), "a2").await, 401, invalid, "the token's signature does not verify")
        .await;
    type Tweak = fn(&mut Value);
    let cases: [(Tweak, &str); 5] = [
        (|c| c["exp"] = json!(now() - 120), "the token has expired"),
        (|c| c["nbf"] = json!(now() + 120), "the token is not valid yet"),
        (|c| c["iss"] = json!("https://evil.example.com"), "the token is from another issuer"),
        (|c| c["aud"] = json!("billing-service"), "the token is for another audience"),
        (
            |c| c.as_object_mut().expect("claims").remove("exp").map(drop).unwrap_or(()),
            "the token lacks a required claim (exp, iss, aud, sub)",
        ),
    ];
    for (tweak, detail) in cases {
        refused(create(&app, Some(&write(tweak)), "a3").await, 401, invalid, detail).await;
    }
    refused(create(&app, Some("not.a.jwt"), "a4").await, 401, invalid, "the token is not a JWT").await;

    // Within the leeway (30 s) an expired-by-10-s token still passes.
    let late = write(|c| c["exp"] = json!(now() - 10));
    assert_eq!(create(&app, Some(&late), "a5").await.status(), 201);

    // A reader may read but not create: 403 naming the scope.
    let reader = token(&signer, "svc-r", "orders:read", |_| {});
    refused(
        create(&app, Some(&reader), "a6").await,
        403,
        r#"error="insufficient_scope", scope="orders:write""#,
        "this operation needs the scope orders:write",
    )
    .await;
    let created: Value = create(&app, Some(&write(|_| {})), "a7").await.json().await.expect("json");
    let get = app.client.get(format!("{}/v1/orders/{}", app.http, created["id"].as_str().expect("id")));
    assert_eq!(get.bearer_auth(&reader).send().await.expect("get").status(), 200);
    // `scp` as a list works as well as `scope`.
    let listed = token(&signer, "svc-l", "", |c| c["scp"] = json!(["orders:read"]));
    let list =
        app.client.get(format!("{}/v1/orders", app.http)).bearer_auth(&listed).send().await.expect("list");
    assert_eq!(list.status(), 200);

    // Probes stay open.
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn rs256_es256_and_eddsa_keys_all_verify_and_the_subject_scopes_idempotency_keys() {
    let (rsa, ec, ed) = (rs256("rsa-1"), es256("ec-1"), eddsa("ed-1"));
    let (app, _dir) = app_with_jwks_file(&[&rsa, &ec, &ed]).await;
    let mut ids = Vec::new();
    for (key, sub) in [(&rsa, "svc-rsa"), (&ec, "svc-ec"), (&ed, "svc-ed")] {
        let response = create(&app, Some(&token(key, sub, "orders:write", |_| {})), "same-key").await;
        assert_eq!(response.status(), 201, "{:?}", key.alg);
        assert!(
            response.headers().get("idempotent-replayed").is_none(),
            "each subject has its own key space"
        );
        ids.push(response.json::<Value>().await.expect("json")["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "three subjects, one key, three orders");
    // The same subject again: a replay of its own order.
    let again = create(&app, Some(&token(&ec, "svc-ec", "orders:write", |_| {})), "same-key").await;
    assert_eq!(again.json::<Value>().await.expect("json")["id"], ids[1]);
}

#[tokio::test]
async fn grpc_callers_need_a_token_and_health_checks_do_not() {
    let signer = eddsa("g1");
    let (app, _dir) = app_with_jwks_file(&[&signer]).await;
    let mut client = app.grpc().await;
    let create = |bearer: Option<String>| {
        let mut request = tonic::Request::new(CreateOrderRequest {
            customer_id: "cust-1".into(),
            items: vec![LineItem { sku: "SKU-1".into(), quantity: 1, unit_price_minor: 100 }],
            currency: "EUR".into(),
            ..Default::default()
        });
        request.metadata_mut().insert("idempotency-key", "g-1".parse().expect("metadata"));
        if let Some(token) = bearer {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().expect("metadata"));
        }
        request
    };
    let status = client.create_order(create(None)).await.expect_err("no token");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        status.metadata().get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some(r#"Bearer realm="orders-service""#)
    );
    let reader = token(&signer, "svc-r", "orders:read", |_| {});
    let status = client.create_order(create(Some(reader.clone()))).await.expect_err("read scope only");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let created = client
        .create_order(create(Some(token(&signer, "svc-w", "orders:write", |_| {}))))
        .await
        .expect("created");
    let id = created.into_inner().order.expect("order").id;
    let mut get = tonic::Request::new(GetOrderRequest { id });
    get.metadata_mut().insert("authorization", format!("Bearer {reader}").parse().expect("metadata"));
    client.get_order(get).await.expect("a reader reads");

    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let serving =
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health");
    assert_eq!(
        serving.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn keys_served_over_http_rotate_and_an_unknown_key_is_refetched() {
    let (old, new) = (es256("2026-01"), es256("2026-02"));
    let served = Arc::new(Mutex::new(jwks(&[&old])));
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = {
        let (served, fetches) = (served.clone(), fetches.clone());
        axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body = served.lock().expect("lock").clone();
                async move { ([("content-type", "application/json")], body) }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let app = TestApp::spawn_configured(&[
        ("APP_AUTH__ENABLED", "true"),
        ("APP_AUTH__JWKS_URL", &url),
        ("APP_AUTH__ISSUER", ISSUER),
        ("APP_AUTH__AUDIENCE", AUDIENCE),
    ])
    .await;
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1, "fetched at startup");
    assert_eq!(create(&app, Some(&token(&old, "svc", "orders:write", |_| {})), "r1").await.status(), 201);

    // The provider rotates: the new key appears, tokens name it, the service refetches once.
    *served.lock().expect("lock") = jwks(&[&old, &new]);
    assert_eq!(create(&app, Some(&token(&new, "svc", "orders:write", |_| {})), "r2").await.status(), 201);
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Made-up key ids do not make it hammer the provider (one refetch per 10 s at most).
    let stranger = es256("made-up");
    for i in 0..5 {
        let response =
            create(&app, Some(&token(&stranger, "svc", "orders:write", |_| {})), &format!("r3-{i}")).await;
        assert_eq!(response.status(), 401);
    }
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2, "no refetch within 10 s of the last");
}
