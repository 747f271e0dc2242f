//! Pushes under a burst of changes: a node pushes the latest state of a service once for
//! changes that come faster than it pushes them, so a subscriber may see fewer pushes
//! than changes. What it must see: revisions that only increase (never an older view
//! after a newer one, not the same one twice), and the final state of the service.

use std::collections::HashMap;
use std::time::Duration;

use shoal_proto::{ClientFrame, Request, Response, ServerFrame};
use shoal_storage::{ServiceKey, ServiceView};
use shoal_tests::*;

/// Generous bound for anything the node does on its own.
const PATIENCE: Duration = Duration::from_secs(20);

/// Sends `requests` without waiting for their answers, then collects every answer:
/// the highest revision applied to each service.
async fn burst(client: &mut RawClient, requests: Vec<Request>) -> HashMap<ServiceKey, u64> {
    let mut service_of = HashMap::new();
    for (i, body) in requests.into_iter().enumerate() {
        // Ids far from those RawClient::request uses.
        let id = 1_000_000 + i as u64;
        let service = match &body {
            Request::Register { service, .. } | Request::Deregister { service, .. } => {
                service.clone()
            }
            other => panic!("not a write: {other:?}"),
        };
        service_of.insert(id, service);
        client.send_frame(&ClientFrame::Request { id, body }).await;
    }
    let mut latest: HashMap<ServiceKey, u64> = HashMap::new();
    while !service_of.is_empty() {
        match client.next_event(PATIENCE).await {
            Event::Frame(ServerFrame::Response { id, result }) => {
                let service = service_of.remove(&id).expect("an answer to a request sent");
                let Ok(Response::Applied { revision }) = result else {
                    panic!("write {id} answered {result:?}");
                };
                let r = latest.entry(service).or_default();
                *r = (*r).max(revision);
            }
            other => panic!("expected answers to the burst, got {other:?}"),
        }
    }
    latest
}

/// The last state of a service a subscriber must see.
enum Final {
    /// The view at this revision.
    Revision(u64),
    /// A view without instances at a revision above 0 (the service was emptied; it
    /// was not empty since the subscription).
    Emptied,
}

/// Takes a subscriber's pushes until each service in `last` was pushed in its final
/// state; checks that each service's revisions strictly increase from `since` (the
/// revisions of the Subscribe answers). Returns the number of pushes and the last view
/// of each service.
async fn pushes_until(
    who: &str,
    client: &mut RawClient,
    since: &HashMap<ServiceKey, u64>,
    last: &HashMap<ServiceKey, Final>,
) -> HashMap<ServiceKey, (usize, ServiceView)> {
    let mut got: HashMap<ServiceKey, (usize, ServiceView)> = HashMap::new();
    let done = |got: &HashMap<ServiceKey, (usize, ServiceView)>| {
        last.iter().all(|(s, f)| {
            got.get(s).is_some_and(|(_, v)| match f {
                Final::Revision(r) => v.revision == *r,
                Final::Emptied => v.instances.is_empty(),
            })
        })
    };
    while !done(&got) {
        let view = client.next_push(PATIENCE).await;
        let before = got
            .get(&view.key)
            .map(|(_, v)| v.revision)
            .or_else(|| since.get(&view.key).copied())
            .unwrap_or_else(|| panic!("{who}: a push of {} it did not subscribe to", view.key));
        assert!(
            view.revision > before,
            "{who}: {} pushed at revision {} after {before}",
            view.key,
            view.revision
        );
        if let Final::Revision(r) = last[&view.key] {
            assert!(
                view.revision <= r,
                "{who}: {} pushed at revision {} after its last change ({r})",
                view.key,
                view.revision
            );
        }
        let n = got.get(&view.key).map_or(0, |(n, _)| *n);
        got.insert(view.key.clone(), (n + 1, view));
    }
    // Nothing after the final state (the answer to a ping comes after what was queued
    // before it). That holds for the emptied service too: the push thread may read it
    // already empty for a change noted before the last deregistrations; that emptiness
    // goes out once, labelled with the earlier revision, and the last change's own
    // note finds nothing new to push (the node's `Sent::admit`).
    client.ping().await;
    assert_eq!(client.take_pushes(), vec![], "{who}: pushes after the last");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_after_a_burst_of_changes_end_with_the_final_state_revisions_only_increase() {
    let cluster = Cluster::start(2).await;
    cluster.wait_until_converged().await;
    let kept = svc("burst-kept");
    let emptied = svc("burst-emptied");
    const N: u16 = 300;

    // One subscriber on each node before the burst: one node applies each write, the
    // other gets it by replication (in batches).
    let mut early = Vec::new();
    let mut since = HashMap::new();
    for node in cluster.nodes() {
        let (mut sub, _) = RawClient::session(node).await;
        for s in [&kept, &emptied] {
            let view = sub.subscribe(s).await;
            assert_eq!(view.revision, 0, "{s} does not exist yet");
            since.insert(s.clone(), 0);
        }
        early.push(sub);
    }

    // The burst, pipelined: N registrations in each service, then the first third of
    // `kept` and all of `emptied` deregistered. Neither final state occurred before.
    let (mut writer, _) = RawClient::session(cluster.node(0)).await;
    let mut first = Vec::new();
    for port in 1..=N {
        for s in [&kept, &emptied] {
            first.push(Request::Register {
                service: s.clone(),
                instance: inst("10.2.0.1", port),
            });
        }
    }
    let mut second = Vec::new();
    for port in 1..=N {
        if port <= N / 3 {
            second.push(Request::Deregister {
                service: kept.clone(),
                instance: inst("10.2.0.1", port).key(),
            });
        }
        second.push(Request::Deregister {
            service: emptied.clone(),
            instance: inst("10.2.0.1", port).key(),
        });
    }
    burst(&mut writer, first).await;
    // A subscriber that arrives between the two halves of the burst.
    let (mut late, _) = RawClient::session(cluster.node(1)).await;
    let mut late_since = HashMap::new();
    for s in [&kept, &emptied] {
        late_since.insert(s.clone(), late.subscribe(s).await.revision);
    }
    burst(&mut writer, second).await;
    cluster.wait_until_converged().await;

    // Each node stamps the changes it applies with its own revisions: the final
    // revision of `kept` is what the node answers now.
    let expected_kept: Vec<_> = (N / 3 + 1..=N).map(|p| addr("10.2.0.1", p)).collect();
    let mut received = vec![0usize; cluster.nodes().len()];
    let mut subs: Vec<(String, usize, &mut RawClient, &HashMap<ServiceKey, u64>)> = early
        .iter_mut()
        .enumerate()
        .map(|(i, c)| (cluster.node(i).id().to_string(), i, c, &since))
        .collect();
    subs.push(("late".into(), 1, &mut late, &late_since));
    for (who, i, sub, since) in subs {
        let now = sub.query(&kept).await;
        assert_eq!(addrs(&now), expected_kept, "{who}");
        let last = HashMap::from([
            (kept.clone(), Final::Revision(now.revision)),
            (emptied.clone(), Final::Emptied),
        ]);
        let got = pushes_until(&who, sub, since, &last).await;
        assert_eq!(addrs(&got[&kept].1), expected_kept, "{who}");
        received[i] += got.values().map(|(n, _)| n).sum::<usize>();
        eprintln!(
            "{who}: {} pushes for {} changes",
            got.values().map(|(n, _)| n).sum::<usize>(),
            2 * N + N + N / 3
        );
    }

    // `shoal_pushes_total` counts the pushes queued, which is what the subscribers got.
    for (i, node) in cluster.nodes().iter().enumerate() {
        let metrics = node.get("/metrics").await.body;
        assert_eq!(
            counter(&metrics, "shoal_pushes_total") as usize,
            received[i],
            "{}",
            node.id()
        );
    }
}
