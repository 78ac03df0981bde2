//! Every method shape the macro accepts, served and called on the embedded broker.

use std::time::Duration;

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    x: i32,
    y: i32,
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Nope {
    Never,
}

/// A service with a name of its own on the wire.
#[rpc_core::service(name = "shapes.v1")]
pub trait Shapes {
    /// No arguments, no output.
    async fn ping(&self);
    /// Structs in and out, a `mut` binding.
    async fn shift(&self, mut p: Point, by: i32) -> Point;
    /// A `Result` with the user's error type, under a qualified path.
    async fn checked(&self, n: u8) -> core::result::Result<u8, Nope>;
    /// A default body.
    async fn twice(&self, n: u32) -> u32 {
        n * 2
    }
    /// A raw identifier.
    async fn r#type(&self) -> String;
    /// Fire-and-forget.
    #[rpc(oneway)]
    async fn note(&self, text: String);
    /// To every subscriber group.
    #[rpc(broadcast)]
    async fn tell(&self, text: String) -> ();
}

struct Impl;

impl Shapes for Impl {
    async fn ping(&self) {}

    async fn shift(&self, mut p: Point, by: i32) -> Point {
        p.x += by;
        p.y += by;
        p
    }

    async fn checked(&self, n: u8) -> Result<u8, Nope> {
        Ok(n)
    }

    async fn r#type(&self) -> String {
        "shape".into()
    }

    async fn note(&self, _text: String) {}

    async fn tell(&self, _text: String) {}
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    assert_eq!(ShapesClient::SHIFT.service(), "shapes.v1");
    assert_eq!(ShapesClient::TYPE.name(), "type");
    let broker = rpc_broker::Embedded::new();
    let _server = rpc_core::Server::new(broker.clone()).serve(ShapesServer::new(Impl)).await.unwrap();
    let client = rpc_core::Client::connect(broker).await.unwrap();
    let shapes = ShapesClient::new(&client);
    shapes.ping().await.unwrap();
    assert_eq!(shapes.shift(Point { x: 1, y: 2 }, 1).await.unwrap(), Point { x: 2, y: 3 });
    assert_eq!(shapes.checked(7).timeout(Duration::from_secs(5)).await.unwrap(), Ok(7));
    assert_eq!(shapes.twice(21).await.unwrap(), 42);
    assert_eq!(shapes.r#type().await.unwrap(), "shape");
    shapes.note("hi".into()).await.unwrap();
    shapes.tell("all".into()).await.unwrap();
}
