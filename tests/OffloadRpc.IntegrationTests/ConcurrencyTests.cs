using System.Buffers.Binary;
using OffloadRpc.Testing;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Many threads on one connection, many connections on one server, and full rings and arenas.</summary>
public sealed class ConcurrencyTests
{
    [Fact]
    public async Task Eight_threads_times_ten_thousand_calls_get_exactly_their_own_responses()
    {
        await using RemoteServer server = RemoteServer.Start("concurrency");
        await using RpcConnection connection = await server.ConnectAsync();
        const int Threads = 8;
        const int CallsPerThread = 10_000;
        var seen = new int[Threads * CallsPerThread];
        var workers = new Task[Threads];
        for (int t = 0; t < Threads; t++)
        {
            int thread = t;
            workers[t] = Task.Run(async () =>
            {
                byte[] body = new byte[16 + thread * 3];
                for (int i = 0; i < CallsPerThread; i++)
                {
                    int id = thread * CallsPerThread + i;
                    BinaryPrimitives.WriteInt32LittleEndian(body, id);
                    BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(4), Checksum64.Compute(BitConverter.GetBytes(id)));
                    using RpcReply reply = await connection.CallAsync(PeerMethods.Echo, body, default);
                    Assert.Equal(body.Length, reply.Body.Length);
                    int echoed = BinaryPrimitives.ReadInt32LittleEndian(reply.Body);
                    Assert.Equal(id, echoed);
                    Assert.True(reply.Body.SequenceEqual(body));
                    Interlocked.Increment(ref seen[echoed]);
                }
            });
        }

        await Task.WhenAll(workers).WaitAsync(TimeSpan.FromMinutes(3));
        Assert.All(seen, count => Assert.Equal(1, count));
    }

    [Fact]
    public async Task More_calls_in_flight_than_ring_slots_wait_and_none_is_dropped()
    {
        // 8 slots per direction; 200 concurrent sleeping calls must queue for entries and slots.
        await using RemoteServer server = RemoteServer.Start("backpressure", "--slots", "8");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { SlotCount = 8 });
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 5);
        var calls = new Task<int>[200];
        for (int i = 0; i < calls.Length; i++)
        {
            calls[i] = Task.Run(async () =>
            {
                using RpcReply reply = await connection.CallAsync(PeerMethods.Sleep, body, default);
                return reply.Body.Length;
            });
        }

        int[] results = await Task.WhenAll(calls).WaitAsync(TimeSpan.FromMinutes(2));
        Assert.Equal(200, results.Length);
        Assert.All(results, length => Assert.Equal(0, length)); // each got its own (empty) Sleep reply, not another call's
    }

    [Fact]
    public async Task A_full_arena_makes_senders_wait_for_releases_and_every_payload_arrives_intact()
    {
        await using RemoteServer server = RemoteServer.Start("arena-full");
        // An arena of 8 MiB in 4 MiB segments; 24 concurrent 1 MiB payloads held by the server for a while.
        var options = new TransportOptions { SegmentSize = 4 << 20, MaxArenaBytes = 8 << 20 };
        await using RpcConnection connection = await server.ConnectAsync(options);
        byte[] hold = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(hold, 20);
        var calls = new Task[24];
        for (int i = 0; i < calls.Length; i++)
        {
            ulong seed = (ulong)i;
            calls[i] = Task.Run(async () =>
            {
                byte[] payload = new byte[1 << 20];
                Checksum64.Fill(payload, seed);
                using (RpcReply held = await connection.CallAsync(PeerMethods.Hold, hold, [OutboundPayload.Copy(payload)]))
                {
                }

                using RpcReply reply = await connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payload)]);
                Assert.Equal(Checksum64.Compute(payload), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
            });
        }

        await Task.WhenAll(calls).WaitAsync(TimeSpan.FromMinutes(2));
        Assert.True(connection.Arena.TotalBytes <= 8 << 20);
    }

    [Fact]
    public async Task A_payload_larger_than_the_arena_may_grow_fails_at_once_with_ArenaExhaustedException()
    {
        await using RemoteServer server = RemoteServer.Start("arena-limit");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { SegmentSize = 1 << 20, MaxArenaBytes = 4 << 20 });
        await Assert.ThrowsAsync<ArenaExhaustedException>(async () => await connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(new byte[5 << 20])]));

        // Leases nobody returns fill the arena; the next allocation gives up after the configured wait.
        await using RpcConnection short_ = await server.ConnectAsync(new TransportOptions { SegmentSize = 1 << 20, MaxArenaBytes = 2 << 20, ArenaWaitTimeout = TimeSpan.FromMilliseconds(300) });
        using SharedBuffer a = short_.Rent(1 << 20);
        using SharedBuffer b = short_.Rent(1 << 20);
        Assert.Throws<ArenaExhaustedException>(() => short_.Rent(1 << 20));
        a.Dispose();
        using SharedBuffer c = short_.Rent(1 << 20); // space came back
        Assert.Equal(1 << 20, c.Length);
    }

    [Fact]
    public async Task A_sender_waiting_for_arena_space_wakes_when_this_process_frees_a_lease()
    {
        await using RemoteServer server = RemoteServer.Start("arena-local-free");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { SegmentSize = 2 << 20, MaxArenaBytes = 2 << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(20) });
        SharedBuffer held = connection.Rent(2 << 20);
        Task<int> waiting = Task.Run(() =>
        {
            using SharedBuffer next = connection.Rent(1 << 20); // blocks: the arena is full
            return next.Length;
        });
        await Task.Delay(100);
        Assert.False(waiting.IsCompleted);
        held.Dispose(); // a local free, not a release from the peer
        Assert.Equal(1 << 20, await waiting.WaitAsync(TimeSpan.FromSeconds(60)));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_blocking_handler_holds_up_its_connection_only_when_dispatched_inline(bool threadPool)
    {
        await using RemoteServer server = threadPool ? RemoteServer.Start("dispatch-pool", "--thread-pool-dispatch") : RemoteServer.Start("dispatch-inline");
        // Continuations inline on the client's receive thread: each reply's task completes in the order
        // the replies arrive, so "which finished first" is the server's order, not the thread pool's
        // (inline, the two replies are microseconds apart and pooled continuations could swap them).
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { RunContinuationsAsynchronously = false });
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 1500);
        Task<string> blocked = Answer(connection.CallAsync(PeerMethods.BlockSync, body, default));
        await Task.Delay(200); // the blocking call is being served
        Task<string> echo = Answer(connection.CallAsync(PeerMethods.Echo, "quick"u8, default));
        Task first = await Task.WhenAny(blocked, echo).WaitAsync(TimeSpan.FromSeconds(60));
        await Task.WhenAll(blocked, echo).WaitAsync(TimeSpan.FromSeconds(60));

        // Inline, the receive thread is inside the blocking handler: the echo waits behind it. On the
        // thread pool, the receive thread takes the echo at once and it overtakes.
        Assert.Same(threadPool ? echo : blocked, first);
        Assert.Equal("blocked", await blocked);
        Assert.Equal("quick", await echo);

        static async Task<string> Answer(ValueTask<RpcReply> call)
        {
            using RpcReply reply = await call;
            return System.Text.Encoding.UTF8.GetString(reply.Body);
        }
    }

    [Fact]
    public async Task A_method_that_blocks_inline_moves_to_the_thread_pool_by_itself()
    {
        // Inline dispatch runs handlers on the poller, which serves every connection of the process: a
        // method whose synchronous part takes long must not keep doing that. After one slow call (served
        // inline: nothing was known yet) the next runs on the thread pool, and a quick call overtakes it.
        await using RemoteServer server = RemoteServer.Start("dispatch-learns");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { RunContinuationsAsynchronously = false });
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 300);
        using (RpcReply first = await connection.CallAsync(PeerMethods.BlockSync, body, default).AsTask().WaitAsync(TimeSpan.FromSeconds(60)))
        {
            Assert.Equal("blocked", System.Text.Encoding.UTF8.GetString(first.Body));
        }

        BinaryPrimitives.WriteInt32LittleEndian(body, 1500);
        Task<RpcReply> blocked = connection.CallAsync(PeerMethods.BlockSync, body, default).AsTask();
        await Task.Delay(200);
        using RpcReply echo = await connection.CallAsync(PeerMethods.Echo, "quick"u8, default).AsTask().WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal("quick", System.Text.Encoding.UTF8.GetString(echo.Body));
        Assert.False(blocked.IsCompleted, "the quick call should have overtaken the blocking one");
        using RpcReply late = await blocked.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal("blocked", System.Text.Encoding.UTF8.GetString(late.Body));
    }

    [Fact]
    public async Task One_server_serves_several_client_connections_at_once()
    {
        await using RemoteServer server = RemoteServer.Start("many");
        var connections = new RpcConnection[4];
        for (int i = 0; i < connections.Length; i++)
        {
            connections[i] = await server.ConnectAsync();
        }

        try
        {
            await Task.WhenAll(connections.Select((c, i) => Task.Run(async () =>
            {
                byte[] payload = new byte[(i + 1) << 18];
                Checksum64.Fill(payload, (ulong)i);
                for (int k = 0; k < 50; k++)
                {
                    using RpcReply reply = await c.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payload)]);
                    Assert.Equal(Checksum64.Compute(payload), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
                }
            })));

            using RpcReply stats = await connections[0].CallAsync(PeerMethods.Stats, default, default);
            Assert.Equal(4, BinaryPrimitives.ReadInt32LittleEndian(stats.Body[16..]));
        }
        finally
        {
            foreach (RpcConnection c in connections)
            {
                await c.DisposeAsync();
            }
        }
    }
}
