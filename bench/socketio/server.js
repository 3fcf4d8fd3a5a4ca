// Socket.IO 4 + @socket.io/redis-adapter counterpart of patchbay for the fan-out and idle
// scenarios. Started by patchbay-bench with PORT and REDIS_URL in the environment.
//
// Clients emit "subscribe" with a room name and get "subscribed" back once joined. Backend
// messages arrive the way they do for patchbay, `PUBLISH patchbay:room:<room> <action JSON>`,
// so the bench publishes identically for every target; each becomes
// `io.local.to(room).emit(action.type, action.payload)`. `io.local` because every instance
// receives the Redis message itself: re-broadcasting through the adapter would make each
// instance publish it again. The adapter is attached as in a multi-instance deployment (room
// bookkeeping, inter-node requests), and its own Redis subscriptions are live.
"use strict";

const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const port = Number(process.env.PORT || 3000);
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const prefix = "patchbay:room:";

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  const feed = pub.duplicate();
  for (const c of [pub, sub, feed]) c.on("error", (e) => console.error("redis:", e.message));
  await Promise.all([pub.connect(), sub.connect(), feed.connect()]);

  const httpServer = createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pub, sub),
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (room) => {
      room = String(room);
      socket.join(room);
      socket.emit("subscribed", room);
    });
  });

  await feed.pSubscribe(prefix + "*", (message, channel) => {
    let action;
    try {
      action = JSON.parse(message);
    } catch {
      return;
    }
    if (!action || typeof action.type !== "string") return;
    io.local.to(channel.slice(prefix.length)).emit(action.type, action.payload);
  });

  httpServer.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
