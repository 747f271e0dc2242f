//! Property 6: bad input gets a clear error and changes nothing, and the node keeps
//! serving everyone else.
//!
//! One node, one well-behaved client holding a session (an instance and a
//! subscription) all along, and a series of misbehaving clients: invalid requests on a
//! session, then connections that break the framing or the handshake. Afterwards the
//! registry is exactly as it was and the well-behaved client notices nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_proto::{ClientFrame, ErrorCode, Hello, Request, Response, ServerFrame};
use shoal_storage::{InstanceKey, InstanceSpec, ServiceKey, ServiceMeta, TtlLease};
use shoal_tests::*;

/// Generous bound for anything the node does on its own (grace expiry, pushes).
const PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let node = Node::start(
        NodeOptions::default()
            .namespace("staging")
            .session_grace_ms(1_000),
    )
    .await;
    let orders = svc("orders");

    // A well-behaved client: a session, an instance in `public` and one in `staging`,
    // and a subscription to `orders`.
    let (mut good, _) = RawClient::session(&node).await;
    good.register(&orders, inst("10.0.0.1", 8080)).await;
    let staging = ServiceKey::new("staging", "DEFAULT_GROUP", "orders");
    good.register(&staging, inst("10.0.0.9", 9090)).await;
    let view = good.subscribe(&orders).await;
    assert_eq!(addrs(&view), vec![addr("10.0.0.1", 8080)]);
    let before = node.dump().await;
    let info_before = node.info().await;

    // Kept open: it is one of the live sessions counted at the end.
    let _bad = invalid_requests_are_refused_one_by_one(&node, &orders).await;
    assert_eq!(
        node.dump().await,
        before,
        "invalid requests changed the registry"
    );

    broken_connections_are_refused(&node).await;
    assert_eq!(
        node.dump().await,
        before,
        "broken connections changed the registry"
    );
    for field in ["services", "instances"] {
        assert_eq!(node.info().await[field], info_before[field], "{field}");
    }

    // The well-behaved session noticed nothing: no push arrived (a push would be
    // queued before the answer to this Ping), and it still works.
    good.ping().await;
    assert_eq!(good.take_pushes(), vec![], "pushes caused by refused input");
    let view = good.query(&orders).await;
    assert_eq!(addrs(&view), vec![addr("10.0.0.1", 8080)]);

    // A write through another good connection reaches the subscriber.
    let (mut other, _) = RawClient::session(&node).await;
    other.register(&orders, inst("10.0.0.2", 8080)).await;
    let push = good.next_push(PATIENCE).await;
    assert_eq!(
        addrs(&push),
        vec![addr("10.0.0.1", 8080), addr("10.0.0.2", 8080)]
    );
    assert_eq!(node.get("/healthz").await.status, 200);
    assert_eq!(node.get("/readyz").await.status, 200);

    // The sessions that misbehaved after Hello are gone after their grace period; the
    // ones refused before Hello never were sessions. Left: `good`, the client of the
    // invalid requests (still connected) and `other`.
    wait_for("only the three live sessions remain", PATIENCE, || async {
        node.info().await["sessions"] == 3
    })
    .await;
}

/// Each invalid request gets `Response{Err(code)}` on a session that stays usable.
/// Returns the client, still connected.
async fn invalid_requests_are_refused_one_by_one(node: &Node, orders: &ServiceKey) -> RawClient {
    let (mut bad, _) = RawClient::session(node).await;

    let register =
        |service: ServiceKey, instance: InstanceSpec| Request::Register { service, instance };
    let with = |f: &dyn Fn(&mut InstanceSpec)| {
        let mut i = inst("10.0.0.3", 8080);
        f(&mut i);
        i
    };
    let many_entries: BTreeMap<String, String> = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let ok = inst("10.0.0.3", 8080);

    let cases: Vec<(&str, Request, ErrorCode)> = vec![
        (
            "RegisterMany of more than MAX_BATCH_ITEMS items",
            Request::RegisterMany {
                items: (0..=shoal_proto::MAX_BATCH_ITEMS as u16)
                    .map(|p| (orders.clone(), inst("10.0.0.3", 10_000 + p)))
                    .collect(),
            },
            ErrorCode::BadRequest,
        ),
        (
            "empty service name",
            register(svc(""), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "service name of 129 bytes",
            register(svc(&"s".repeat(129)), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "space in service name",
            register(svc("a b"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "slash in service name",
            register(svc("a/b"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "non-ASCII service name",
            register(svc("ordérs"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "newline in service name",
            register(svc("a\nb"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "empty group",
            register(ServiceKey::new("public", "", "orders"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "empty namespace",
            register(ServiceKey::new("", "DEFAULT_GROUP", "orders"), ok.clone()),
            ErrorCode::InvalidName,
        ),
        (
            "bad cluster name",
            register(orders.clone(), with(&|i| i.cluster = "a b".into())),
            ErrorCode::InvalidName,
        ),
        (
            "port 0",
            register(orders.clone(), with(&|i| i.port = 0)),
            ErrorCode::InvalidPort,
        ),
        (
            "weight -1",
            register(orders.clone(), with(&|i| i.weight = -1.0)),
            ErrorCode::InvalidWeight,
        ),
        (
            "weight 10001",
            register(orders.clone(), with(&|i| i.weight = 10_001.0)),
            ErrorCode::InvalidWeight,
        ),
        (
            "weight NaN",
            register(orders.clone(), with(&|i| i.weight = f64::NAN)),
            ErrorCode::InvalidWeight,
        ),
        (
            "weight infinite",
            register(orders.clone(), with(&|i| i.weight = f64::INFINITY)),
            ErrorCode::InvalidWeight,
        ),
        (
            "ip not an address",
            register(orders.clone(), with(&|i| i.ip = "not-an-ip".into())),
            ErrorCode::InvalidIp,
        ),
        (
            "ip octet out of range",
            register(orders.clone(), with(&|i| i.ip = "10.0.0.256".into())),
            ErrorCode::InvalidIp,
        ),
        (
            "empty ip",
            register(orders.clone(), with(&|i| i.ip = String::new())),
            ErrorCode::InvalidIp,
        ),
        (
            "metadata with an empty key",
            register(
                orders.clone(),
                with(&|i| {
                    i.metadata.insert(String::new(), "v".into());
                }),
            ),
            ErrorCode::InvalidMetadata,
        ),
        (
            "metadata with 65 entries",
            register(orders.clone(), with(&|i| i.metadata = many_entries.clone())),
            ErrorCode::InvalidMetadata,
        ),
        (
            "metadata key of 129 bytes",
            register(
                orders.clone(),
                with(&|i| {
                    i.metadata.insert("k".repeat(129), "v".into());
                }),
            ),
            ErrorCode::InvalidMetadata,
        ),
        (
            "metadata value of 1025 bytes",
            register(
                orders.clone(),
                with(&|i| {
                    i.metadata.insert("k".into(), "v".repeat(1025));
                }),
            ),
            ErrorCode::InvalidMetadata,
        ),
        (
            "unknown namespace",
            register(
                ServiceKey::new("nope", "DEFAULT_GROUP", "orders"),
                ok.clone(),
            ),
            ErrorCode::UnknownNamespace,
        ),
        (
            "ttl removed before it is unhealthy",
            register(
                orders.clone(),
                with(&|i| {
                    i.ttl = Some(TtlLease {
                        unhealthy_after_ms: 2_000,
                        remove_after_ms: 1_000,
                    })
                }),
            ),
            ErrorCode::InvalidSetting,
        ),
        (
            "protection threshold 1.5",
            Request::SetServiceMeta {
                service: orders.clone(),
                meta: ServiceMeta {
                    protect_threshold: 1.5,
                    ..Default::default()
                },
            },
            ErrorCode::InvalidSetting,
        ),
        (
            "update of an unknown instance",
            Request::Update {
                service: orders.clone(),
                instance: inst("10.9.9.9", 1),
            },
            ErrorCode::NotFound,
        ),
        (
            "deregister of an unknown instance",
            Request::Deregister {
                service: orders.clone(),
                instance: InstanceKey {
                    cluster: "DEFAULT".into(),
                    ip: "10.9.9.9".into(),
                    port: 1,
                },
            },
            ErrorCode::NotFound,
        ),
        (
            "deregister with port 0",
            Request::Deregister {
                service: orders.clone(),
                instance: InstanceKey {
                    cluster: "DEFAULT".into(),
                    ip: "10.0.0.1".into(),
                    port: 0,
                },
            },
            ErrorCode::InvalidPort,
        ),
        (
            "query of an unknown namespace",
            Request::Query {
                service: ServiceKey::new("nope", "DEFAULT_GROUP", "orders"),
                clusters: vec![],
                healthy_only: false,
            },
            ErrorCode::UnknownNamespace,
        ),
        (
            "subscribe with an invalid name",
            Request::Subscribe {
                service: svc("a b"),
            },
            ErrorCode::InvalidName,
        ),
        (
            "unsubscribe without a subscription",
            Request::Unsubscribe {
                service: orders.clone(),
            },
            ErrorCode::BadRequest,
        ),
    ];

    for (case, request, code) in cases {
        let result = bad.request(request).await;
        let message = match &result {
            Err(e) if e.code == code => e.message.clone(),
            other => panic!("{case}: expected Err({code:?}), got {other:?}"),
        };
        assert!(
            !message.is_empty() && !message.contains('\n'),
            "{case}: the message must be one non-empty line: {message:?}"
        );
    }

    // Request errors leave the session usable.
    bad.ping().await;
    bad
}

/// Connections that break the framing or the handshake get an error frame and are
/// closed; each is a fresh connection next to the well-behaved one.
async fn broken_connections_are_refused(node: &Node) {
    let limit = shoal_proto::DEFAULT_MAX_FRAME_BYTES as u32;

    // A valid length prefix with a body that is not MessagePack of a ClientFrame.
    for (when, hello_first) in [("before Hello", false), ("inside a session", true)] {
        let mut c = connect(node, hello_first).await;
        c.send_raw(&frame_of(&[0xc1; 8])).await;
        expect_error(
            &mut c,
            ErrorCode::MalformedFrame,
            &format!("garbage body {when}"),
        )
        .await;

        // Valid MessagePack, but not a ClientFrame.
        let mut c = connect(node, hello_first).await;
        c.send_raw(&frame_of(&[0xa5, b'h', b'e', b'l', b'l', b'o']))
            .await;
        expect_error(
            &mut c,
            ErrorCode::MalformedFrame,
            &format!("a string frame {when}"),
        )
        .await;

        // A length prefix far above the limit, with no body following: the node must
        // answer from the prefix alone, without waiting for or allocating 4 GiB.
        let mut c = connect(node, hello_first).await;
        c.send_raw(&u32::MAX.to_be_bytes()).await;
        expect_error(
            &mut c,
            ErrorCode::FrameTooLarge,
            &format!("0xFFFFFFFF prefix {when}"),
        )
        .await;

        // One byte above the limit.
        let mut c = connect(node, hello_first).await;
        c.send_raw(&(limit + 1).to_be_bytes()).await;
        expect_error(
            &mut c,
            ErrorCode::FrameTooLarge,
            &format!("limit+1 prefix {when}"),
        )
        .await;

        // Half a frame, then the end of the stream.
        let mut c = connect(node, hello_first).await;
        let mut half = 100u32.to_be_bytes().to_vec();
        half.extend_from_slice(&[0x80; 10]);
        c.send_raw(&half).await;
        c.finish();
        match c.refusal().await {
            Refusal::Error(e) => assert_eq!(
                e.code,
                ErrorCode::MalformedFrame,
                "half-written frame {when}: {e}"
            ),
            Refusal::Closed(_) => {}
        }
        expect_connection_closed(&c, &format!("half-written frame {when}")).await;
    }

    // A request before Hello.
    let mut c = RawClient::connect(node).await;
    c.send_frame(&ClientFrame::Request {
        id: 1,
        body: Request::Ping,
    })
    .await;
    expect_error(&mut c, ErrorCode::ProtocolViolation, "request before Hello").await;

    // A protocol version the node does not speak.
    let mut c = RawClient::connect(node).await;
    c.send_frame(&ClientFrame::Hello(Hello {
        version: 99,
        client_name: "from-the-future".into(),
        resume: None,
    }))
    .await;
    expect_error(&mut c, ErrorCode::UnsupportedVersion, "Hello version 99").await;

    // A second Hello.
    let mut c = connect(node, true).await;
    c.send_frame(&ClientFrame::Hello(Hello {
        version: shoal_proto::PROTOCOL_VERSION,
        client_name: "again".into(),
        resume: None,
    }))
    .await;
    expect_error(&mut c, ErrorCode::ProtocolViolation, "second Hello").await;

    // A second stream on a working session: refused, and the session stream goes on.
    let (mut c, _) = RawClient::session(node).await;
    let (mut send, mut recv) = c.connection().open_bi().await.expect("opening a stream");
    send.write_all(&frame_of(&[0x80])).await.expect("writing");
    let _ = send.finish();
    let frame = tokio::time::timeout(
        ANSWER_TIMEOUT,
        shoal_proto::read_frame::<ServerFrame, _>(&mut recv, 1 << 20),
    )
    .await
    .expect("an answer on the extra stream");
    match frame {
        Ok(Some(ServerFrame::Error(e))) => assert_eq!(e.code, ErrorCode::ProtocolViolation),
        other => panic!("extra stream: expected Error(ProtocolViolation), got {other:?}"),
    }
    c.ping().await;
    c.goodbye().await;

    // Many garbage connections at once do not disturb each other or the node.
    let mut flood = Vec::new();
    for i in 0..16u8 {
        flood.push(async move {
            let mut c = RawClient::connect(node).await;
            c.send_raw(&frame_of(&[0xc1, i])).await;
            expect_error(&mut c, ErrorCode::MalformedFrame, "flood").await;
        });
    }
    for f in flood {
        f.await;
    }
}

/// A connection with its session stream open, after Hello when `hello` is true.
async fn connect(node: &Node, hello: bool) -> RawClient {
    let mut c = RawClient::connect(node).await;
    if hello {
        c.hello(None).await;
    }
    c
}

/// A frame with a correct length prefix around `body`.
fn frame_of(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The node must answer `Error(code)` with a one-line message, end the stream and
/// close the connection.
async fn expect_error(c: &mut RawClient, code: ErrorCode, case: &str) {
    match c.refusal().await {
        Refusal::Error(e) => {
            assert_eq!(e.code, code, "{case}: {e}");
            assert!(
                !e.message.is_empty() && !e.message.contains('\n'),
                "{case}: {e}"
            );
        }
        Refusal::Closed(why) => panic!("{case}: closed without an error frame ({why})"),
    }
    expect_connection_closed(c, case).await;
}

/// Waits for the node to close the connection; returns why it did.
async fn expect_connection_closed(c: &RawClient, case: &str) -> quinn::ConnectionError {
    tokio::time::timeout(ANSWER_TIMEOUT, c.connection().closed())
        .await
        .unwrap_or_else(|_| panic!("{case}: the node did not close the connection"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_closed_with_the_protocol_violation_code() {
    // docs/protocol.md, "Close codes": 1 is a protocol violation, 0 a normal end. A
    // client (or an operator reading its logs) must be able to tell the two apart.
    let node = Node::start(NodeOptions::default()).await;
    let second_hello = shoal_proto::encode_frame(
        &ClientFrame::Hello(Hello {
            version: shoal_proto::PROTOCOL_VERSION,
            client_name: "again".into(),
            resume: None,
        }),
        1 << 20,
    )
    .expect("encoding Hello");
    let cases: Vec<(&str, bool, Vec<u8>, ErrorCode)> = vec![
        (
            "garbage before Hello",
            false,
            frame_of(&[0xc1; 8]),
            ErrorCode::MalformedFrame,
        ),
        (
            "garbage inside a session",
            true,
            frame_of(&[0xc1; 8]),
            ErrorCode::MalformedFrame,
        ),
        (
            "oversized prefix inside a session",
            true,
            u32::MAX.to_be_bytes().to_vec(),
            ErrorCode::FrameTooLarge,
        ),
        (
            "second Hello",
            true,
            second_hello,
            ErrorCode::ProtocolViolation,
        ),
    ];
    let mut wrong = Vec::new();
    for (case, hello, bytes, code) in cases {
        let mut c = connect(&node, hello).await;
        c.send_raw(&bytes).await;
        match c.refusal().await {
            Refusal::Error(e) => assert_eq!(e.code, code, "{case}: {e}"),
            Refusal::Closed(why) => panic!("{case}: closed without an error frame ({why})"),
        }
        match expect_connection_closed(&c, case).await {
            quinn::ConnectionError::ApplicationClosed(close) if close.error_code == 1u32.into() => {
            }
            other => wrong.push(format!("{case}: {other}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "connections not closed with code 1 (protocol violation):\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_names_at_the_limits_are_accepted() {
    // The other side of validation: what the rules allow really works end to end.
    let node = Node::start(NodeOptions::default()).await;
    let (mut c, _) = RawClient::session(&node).await;
    let mut accepted = Vec::new();
    for name in [
        "providers:com.foo.Bar:1.0:".to_string(),
        "DEFAULT_GROUP@@orders".to_string(),
        "s".repeat(128),
    ] {
        let key = svc(&name);
        let mut spec = inst("::1", 65535);
        spec.weight = 10_000.0;
        spec.metadata = (0..64)
            .map(|i| (format!("k{i}"), "v".repeat(1024)))
            .collect();
        c.register(&key, spec).await;
        accepted.push(key);
    }
    for key in &accepted {
        let got = node.instances(key).await;
        assert_eq!(got.len(), 1, "{key}");
        assert_eq!(got[0]["ip"], "::1");
    }
    // Another spelling of the same address names the same instance.
    match c
        .request(Request::Deregister {
            service: accepted[0].clone(),
            instance: InstanceKey {
                cluster: "DEFAULT".into(),
                ip: "0:0:0:0:0:0:0:1".into(),
                port: 65535,
            },
        })
        .await
    {
        Ok(Response::Applied { .. }) => {}
        other => panic!("deregister by another spelling of ::1: {other:?}"),
    }
    assert!(node.instances(&accepted[0]).await.is_empty());
}

/// docs/protocol.md, "Framing": a node states its request shape in Welcome, and a
/// client of that shape may send requests with structs as arrays (the SDK does). They
/// are read and checked as maps are: a valid one applies, an invalid value gets the same
/// error, and a frame whose arrays do not fit the shape is malformed, refused on its own
/// connection while everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_with_structs_as_arrays_are_read_and_checked_as_maps_are() {
    let node = Node::start(NodeOptions::default()).await;
    let orders = svc("orders");
    let (mut good, welcome) = RawClient::session(&node).await;
    assert_eq!(welcome.request_shape, shoal_proto::REQUEST_SHAPE);
    good.register(&orders, inst("10.0.0.1", 8080)).await;

    let (mut c, _) = RawClient::session(&node).await;
    c.set_compact(true);
    let mut spec = inst("10.0.0.2", 8081);
    spec.metadata.insert("zone".into(), "b".into());
    spec.weight = 2.5;
    c.register(&orders, spec).await;
    let view = good.query(&orders).await;
    assert_eq!(
        addrs(&view),
        vec![addr("10.0.0.1", 8080), addr("10.0.0.2", 8081)]
    );
    let row = view
        .instances
        .iter()
        .find(|i| i.port == 8081)
        .expect("the compact registration");
    assert_eq!(row.weight, 2.5);
    assert_eq!(row.metadata.get("zone").map(String::as_str), Some("b"));
    let refused = c
        .request(Request::Register {
            service: orders.clone(),
            instance: inst("10.0.0.3", 0),
        })
        .await
        .expect_err("port 0 must be refused");
    assert_eq!(refused.code, ErrorCode::InvalidPort, "{refused}");
    c.goodbye().await;

    // Arrays that do not fit: the instance with one element too many, and with a port
    // that is a string. Each refused on its own connection.
    let valid = shoal_proto::encode_frame_compact(
        &ClientFrame::Request {
            id: 1,
            body: Request::Register {
                service: orders.clone(),
                instance: inst("10.0.0.4", 8080),
            },
        },
        1 << 20,
    )
    .expect("encoding");
    // The instance is the frame's last value, an array of its 8 fields (0x98): make
    // it 9 (0x99) and append a ninth.
    let body = &valid[4..];
    let at = body
        .iter()
        .rposition(|&b| b == 0x98)
        .expect("the instance's array");
    let mut nine = body.to_vec();
    nine[at] = 0x99;
    nine.push(7);
    // The port (a 16-bit integer after the ip's string) as the string "8080".
    let port_at = at + 2 + "10.0.0.4".len();
    assert_eq!(
        body[port_at..port_at + 3],
        [0xcd, 0x1f, 0x90],
        "the port 8080"
    );
    let text = [&body[..port_at], b"\xa48080", &body[port_at + 3..]].concat();
    let cases = [
        ("an instance array of nine elements", frame_of(&nine)),
        ("a port that is a string", frame_of(&text)),
    ];
    for (case, bytes) in cases {
        let mut c = connect(&node, true).await;
        c.send_raw(&bytes).await;
        expect_error(&mut c, ErrorCode::MalformedFrame, case).await;
    }

    // Nothing else changed, and the other session still works.
    good.ping().await;
    let view = good.query(&orders).await;
    assert_eq!(addrs(&view), vec![addr("10.0.0.1", 8080)]);
    assert_eq!(node.get("/readyz").await.status, 200);
}
