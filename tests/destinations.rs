//! Webhook URLs whose host is an IP literal get the same destination guard as
//! the token client (issue 12, item 12): a cloud metadata, link-local or
//! non-unicast address is refused by `config check` and by `serve` at start,
//! with the config key and the address named and nothing else of the URL
//! (its path and query carry the webhook's secret).

mod support_daemon;

use support_daemon::{Opts, Rig};

const PATH_SECRET: &str = "T0KEN-in-the-path-9f3e";

fn webhook(url: &str) -> String {
    format!(
        "[[alerts.webhooks]]\nname = \"ops\"\nkind = \"generic\"\nurl = \"{url}\"\nmin_severity = \"info\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_to_metadata_and_link_local_literals_are_refused_without_leaking_the_url() {
    let rig = Rig::new().await;
    for (host, what) in [
        ("169.254.169.254", "metadata"),
        ("[fd00:ec2::254]", "metadata"),
        ("169.254.7.1", "link-local"),
        ("[fe80::1]", "link-local"),
        ("[::ffff:169.254.169.254]", "metadata"),
        ("224.0.0.1", "not a single host"),
    ] {
        let url = format!("https://{host}/latest/{PATH_SECRET}?key={PATH_SECRET}");
        rig.write_config(&Opts {
            webhooks: webhook(&url),
            ..Opts::default()
        });
        let out = rig.cli(&["config", "check"], None).await;
        assert_ne!(out.code, Some(0), "{host} was accepted: {out:#?}");
        assert!(
            out.stderr.contains("alerts.webhooks[0].url") && out.stderr.contains(what),
            "{host}: the refusal does not name the key and the reason: {out:#?}"
        );
        assert!(
            !out.stderr.contains(PATH_SECRET) && !out.stdout.contains(PATH_SECRET),
            "{host}: the refusal leaks the URL: {out:#?}"
        );
    }

    // `serve` refuses to start on it too, with the same discretion.
    rig.write_config(&Opts {
        webhooks: webhook(&format!("https://169.254.169.254/{PATH_SECRET}")),
        ..Opts::default()
    });
    let mut d = rig.serve(None);
    let status = d.exit().await;
    assert!(!status.success(), "serve started: {}", d.logs());
    let logs = d.logs();
    assert!(logs.contains("169.254.169.254"), "{logs}");
    assert!(!logs.contains(PATH_SECRET), "serve leaked the URL: {logs}");

    // An ordinary private or loopback literal is still fine (operators run
    // receivers on their own network).
    for url in ["https://10.1.2.3/hook", "http://127.0.0.1:9/hook"] {
        rig.write_config(&Opts {
            webhooks: webhook(url),
            ..Opts::default()
        });
        rig.cli(&["config", "check"], None).await.ok();
    }
}
