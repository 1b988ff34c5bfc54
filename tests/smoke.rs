mod common;
use common::*;

#[tokio::test]
async fn smoke() {
    let b = Backend::start("one").await;
    let lb = TestLb::start(&backends_yaml(&[&b])).await;
    let c = client();
    let a = get(&c, &lb.url("/")).await;
    assert_eq!(a.text(), "one");
}
