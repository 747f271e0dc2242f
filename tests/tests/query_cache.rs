//! Nodes answer repeated queries from a cache of encoded answers, valid for the
//! service's revision. These tests query a service through one node (filling its
//! cache), change the service by each path that can change an answer, and query again
//! through the same node: the answer must show the change. A change that did not give
//! the service a new revision would leave the old answer in the cache for good, and
//! these waits would time out.
//!
//! Paths: a local write on the owner (register, update, deregister, service settings),
//! writes replicated from another node (applied operations), a session's removal
//! (Goodbye), and Ttl expiry (lapse to unhealthy, then removal).

use std::time::Duration;

use shoal_client::{Client, QueryOptions, ServiceMeta, TtlLease};
use shoal_storage::{ServiceKey, ServiceView};
use shoal_tests::*;

/// Generous bound for a change to reach a node (replication batches leave within
/// milliseconds; anti-entropy repairs within seconds).
const PATIENCE: Duration = Duration::from_secs(30);

/// Queries through `reader` until `wanted` holds; each query is the same, so every one
/// after the first may come from the node's cache.
async fn query_until(
    reader: &Client,
    service: &ServiceKey,
    options: QueryOptions,
    what: &str,
    wanted: impl Fn(&ServiceView) -> bool,
) -> ServiceView {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let view = reader.query(service, options.clone()).await.expect("query");
        if wanted(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer with {what} within {PATIENCE:?}; last answer {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Queries `n` times and checks every answer is the same (the cache is filled).
async fn prime(reader: &Client, service: &ServiceKey, options: QueryOptions) -> ServiceView {
    let first = reader.query(service, options.clone()).await.expect("query");
    for _ in 0..5 {
        let again = reader.query(service, options.clone()).await.expect("query");
        assert_eq!(
            again, first,
            "repeated queries of an unchanged service differ"
        );
    }
    first
}

fn weight_of(view: &ServiceView, ip: &str) -> Option<f64> {
    view.instances.iter().find(|i| i.ip == ip).map(|i| i.weight)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_follow_local_writes_replication_and_session_removal() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    // `local` is owned by node 0 (writes through node 0 apply there); `remote` by node
    // 2 (node 0 learns of its changes by replication only).
    let local = cluster.service_owned_by(0, "local").await;
    let remote = cluster.service_owned_by(2, "remote").await;
    let reader = cluster.node(0).client().await;
    let writer0 = cluster.node(0).client().await;
    let writer1 = cluster.node(1).client().await;
    let all = QueryOptions::all();
    let healthy = QueryOptions::healthy();

    for (service, writer) in [(&local, &writer0), (&remote, &writer1)] {
        let name = &service.service;
        // Register.
        writer
            .register(service, inst("10.1.0.1", 80))
            .await
            .unwrap();
        query_until(&reader, service, all.clone(), "the first instance", |v| {
            addrs(v) == [addr("10.1.0.1", 80)]
        })
        .await;
        let before = prime(&reader, service, all.clone()).await;
        prime(&reader, service, healthy.clone()).await;
        writer
            .register(service, inst("10.1.0.2", 80))
            .await
            .unwrap();
        let after = query_until(&reader, service, all.clone(), "the second instance", |v| {
            addrs(v) == [addr("10.1.0.1", 80), addr("10.1.0.2", 80)]
        })
        .await;
        assert!(after.revision > before.revision, "{name}");
        query_until(
            &reader,
            service,
            healthy.clone(),
            "the second, healthy",
            |v| v.instances.len() == 2,
        )
        .await;

        // Update: same instances, new weight and health.
        prime(&reader, service, all.clone()).await;
        let mut spec = inst("10.1.0.2", 80);
        spec.weight = 7.5;
        spec.healthy = false;
        writer.update(service, spec).await.unwrap();
        query_until(&reader, service, all.clone(), "the new weight", |v| {
            weight_of(v, "10.1.0.2") == Some(7.5)
        })
        .await;
        query_until(&reader, service, healthy.clone(), "one healthy", |v| {
            addrs(v) == [addr("10.1.0.1", 80)] && !v.protected
        })
        .await;

        // Service settings: a protection threshold of 0.6 with one of two healthy
        // makes the healthy-only answer hold both, protected.
        writer
            .set_service_meta(
                service,
                ServiceMeta {
                    protect_threshold: 0.6,
                    ..ServiceMeta::default()
                },
            )
            .await
            .unwrap();
        query_until(&reader, service, healthy.clone(), "protection", |v| {
            v.protected && v.instances.len() == 2
        })
        .await;
        writer
            .set_service_meta(service, ServiceMeta::default())
            .await
            .unwrap();
        query_until(&reader, service, healthy.clone(), "no protection", |v| {
            !v.protected && v.instances.len() == 1
        })
        .await;

        // Cluster filters are cached apart, and follow changes too.
        let eu = QueryOptions::all().in_clusters(["eu"]);
        let empty = prime(&reader, service, eu.clone()).await;
        assert!(empty.instances.is_empty(), "{name}");
        let mut spec = inst("10.1.0.3", 80);
        spec.cluster = "eu".into();
        writer.register(service, spec).await.unwrap();
        query_until(&reader, service, eu.clone(), "the eu instance", |v| {
            addrs(v) == [addr("10.1.0.3", 80)]
        })
        .await;

        // Deregister.
        prime(&reader, service, all.clone()).await;
        let mut key = inst("10.1.0.1", 80).key();
        writer.deregister(service, &key).await.unwrap();
        query_until(&reader, service, all.clone(), "the first one gone", |v| {
            addrs(v) == [addr("10.1.0.2", 80), addr("10.1.0.3", 80)]
        })
        .await;
        key.ip = "10.1.0.3".into();
        key.cluster = "eu".into();
        writer.deregister(service, &key).await.unwrap();
        query_until(&reader, service, eu, "the eu one gone", |v| {
            v.instances.is_empty()
        })
        .await;
    }

    // Session removal: a session with instances in both services says Goodbye.
    let leaver = cluster.node(0).client().await;
    for service in [&local, &remote] {
        leaver
            .register(service, inst("10.9.9.9", 90))
            .await
            .unwrap();
        query_until(
            &reader,
            service,
            all.clone(),
            "the leaver's instance",
            |v| addrs(v).contains(&addr("10.9.9.9", 90)),
        )
        .await;
        prime(&reader, service, all.clone()).await;
        prime(&reader, service, healthy.clone()).await;
    }
    leaver.close().await.unwrap();
    for service in [&local, &remote] {
        for options in [all.clone(), healthy.clone()] {
            query_until(
                &reader,
                service,
                options,
                "the leaver's instance gone",
                |v| !addrs(v).contains(&addr("10.9.9.9", 90)),
            )
            .await;
        }
    }

    // The answers above came from the cache at least some of the time.
    let metrics = cluster.node(0).get("/metrics").await.body;
    let hits = counter(&metrics, "shoal_query_cache_hits_total");
    let misses = counter(&metrics, "shoal_query_cache_misses_total");
    assert!(hits > 0.0, "no cache hits: {hits} hits, {misses} misses");
    assert!(
        misses > 0.0,
        "no cache misses: {hits} hits, {misses} misses"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_answers_follow_ttl_expiry() {
    let cluster = Cluster::start(3).await;
    cluster.wait_until_converged().await;
    let local = cluster.service_owned_by(0, "ttl-local").await;
    let remote = cluster.service_owned_by(2, "ttl-remote").await;
    let reader = cluster.node(0).client().await;
    let writer = cluster.node(1).client().await;
    let all = QueryOptions::all();
    let healthy = QueryOptions::healthy();
    for service in [&local, &remote] {
        // A session instance (cacheable on its own) and a Ttl instance that never beats.
        writer
            .register(service, inst("10.2.0.1", 80))
            .await
            .unwrap();
        let mut spec = inst("10.2.0.2", 80);
        spec.ttl = Some(TtlLease {
            unhealthy_after_ms: 1_500,
            remove_after_ms: 4_000,
        });
        writer.register(service, spec).await.unwrap();
    }
    for service in [&local, &remote] {
        query_until(&reader, service, healthy.clone(), "both healthy", |v| {
            v.instances.len() == 2
        })
        .await;
        prime(&reader, service, all.clone()).await;
    }
    for service in [&local, &remote] {
        // The lapse: the Ttl instance leaves the healthy-only answer...
        let lapsed = query_until(&reader, service, healthy.clone(), "the lapse", |v| {
            addrs(v) == [addr("10.2.0.1", 80)]
        })
        .await;
        assert!(!lapsed.protected);
        // ...and is still listed, unhealthy, until it is removed.
        query_until(&reader, service, all.clone(), "the removal", |v| {
            addrs(v) == [addr("10.2.0.1", 80)]
        })
        .await;
        // With only session instances left the answer is cached again, and follows a
        // write as before.
        prime(&reader, service, all.clone()).await;
        writer
            .register(service, inst("10.2.0.3", 80))
            .await
            .unwrap();
        query_until(&reader, service, all.clone(), "a new instance", |v| {
            addrs(v) == [addr("10.2.0.1", 80), addr("10.2.0.3", 80)]
        })
        .await;
    }
}
