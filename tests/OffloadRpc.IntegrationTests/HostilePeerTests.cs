using System.Buffers.Binary;
using System.Collections.Concurrent;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Testing;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// Same-uid peers that are buggy or hostile: each probe is a real second process, the server is this
/// process (so its descriptors, threads and mapped bytes can be read from /proc/self and its own
/// counters), and after each probe a well-behaved client is still served and the server's resources are
/// back to their baseline.
/// </summary>
public sealed class HostilePeerTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromMinutes(2);

    [Fact]
    public async Task A_regular_file_at_the_endpoint_path_is_an_error_naming_it_and_is_left_alone()
    {
        string endpoint = Endpoints.Unique("not-a-socket");
        string path = EndpointPath.Resolve(endpoint);
        await File.WriteAllTextAsync(path, "somebody's data");
        try
        {
            var listener = new RpcListener(endpoint, new TransportOptions(), [], _ => throw new InvalidOperationException());
            IOException error = Assert.Throws<IOException>(listener.Start);
            Assert.Contains(path, error.Message);
            Assert.Contains("regular file", error.Message);
            Assert.Equal("somebody's data", await File.ReadAllTextAsync(path));
            await listener.DisposeAsync();
            Assert.True(File.Exists(path));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public async Task Peers_that_send_descriptors_with_half_a_frame_and_hang_up_leave_none_behind()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures);
        await using RpcConnection good = await server.ConnectAsync();
        await EchoAsync(good);
        int baseline = OpenDescriptors();

        await using PeerProcess evil = PeerProcess.Start(["evil-raw", server.Endpoint, "fds-hangup", "300"]);
        evil.WaitForLine("DONE", Bound);

        // 300 peers x 4 descriptors arrived; every one is closed once its peer is gone.
        await Eventually.TrueAsync(() => OpenDescriptors() <= baseline + 4, $"the server's descriptors are back to {baseline} (now {OpenDescriptors()})", Bound);
        await EchoAsync(good);
    }

    [Fact]
    public async Task Silent_peers_cost_no_thread_and_a_trickled_handshake_ends_at_one_deadline()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures, new TransportOptions { HandshakeTimeout = TimeSpan.FromSeconds(3), MaxConcurrentHandshakes = 256 });
        await using RpcConnection good = await server.ConnectAsync();
        await EchoAsync(good);
        int threads = Threads();

        await using PeerProcess silent = PeerProcess.Start(["evil-raw", server.Endpoint, "silent", "129"]);
        silent.WaitForLine("HOLDING", Bound);
        await EchoAsync(good);
        Assert.True(Threads() <= threads + 4, $"129 silent peers took threads: {threads} before, {Threads()} now");

        // A Hello trickled a byte a second would take 208 s; the handshake's one deadline ends it after ~3 s.
        await using PeerProcess trickle = PeerProcess.Start(["evil-raw", server.Endpoint, "trickle-hello", "1"]);
        string closed = trickle.WaitForLine("CLOSED", Bound);
        Assert.InRange(int.Parse(closed.Split(' ')[1]), 1, 30);

        Assert.Equal("CLOSED 129", silent.WaitForLine("CLOSED", Bound)); // each dropped at the handshake timeout
        await EchoAsync(good);
    }

    [Fact]
    public async Task Handshakes_past_their_budget_are_refused_at_once_and_reported()
    {
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures, new TransportOptions { HandshakeTimeout = TimeSpan.FromSeconds(20), MaxConcurrentHandshakes = 8 });
        await using PeerProcess silent = PeerProcess.Start(["evil-raw", server.Endpoint, "silent", "40"]);
        silent.WaitForLine("HOLDING", Bound);
        await Eventually.TrueAsync(() => failures.Count(f => f.Message.Contains("MaxConcurrentHandshakes")) >= 32, "the 32 clients past the budget are reported", Bound);
        await silent.DisposeAsync(); // the eight in progress go away with their process

        await using RpcConnection good = await server.ConnectAsync();
        await EchoAsync(good);
    }

    [Theory]
    [InlineData("segment-flood", "past its budget of 8 segments")]
    [InlineData("segment-bytes", "past its budget of 268435456 mapped bytes")]
    [InlineData("socket-descriptor", "not a shared-memory segment")]
    // It reuses call ids: depending on timing its answer ring is found full first, or a request reuses the
    // index of a call whose answer is still waiting for room; either is this peer's violation.
    [InlineData("no-consume", "consumed answers|still being served")]
    [InlineData("pipelined-trickle", "stalled at")]
    public async Task A_peer_past_a_budget_is_disconnected_alone_and_its_memory_given_back(string kind, string cause)
    {
        var failures = new ConcurrentQueue<Exception>();
        var options = new TransportOptions { MaxPeerSegments = 8, MaxPeerMappedBytes = 256L << 20, ArenaWaitTimeout = TimeSpan.FromSeconds(1), SlotCount = 64 };
        await using var server = new InProcessServer(failures, options);
        await using RpcConnection good = await server.ConnectAsync();
        await EchoAsync(good);
        long mapped = RpcConnection.PeerMappedBytes;
        int descriptors = OpenDescriptors();

        await using PeerProcess evil = PeerProcess.Start(["evil-client", server.Endpoint, kind]);
        evil.WaitForLine("SENT", Bound);
        await EchoAsync(good); // served while the evil peer is at it
        Assert.Contains("PeerDisconnectedException", evil.WaitForLine("CLOSED", Bound));

        await Eventually.TrueAsync(() => !failures.IsEmpty, "the server reports the violation", Bound);
        ProtocolViolationException violation = Assert.IsType<ProtocolViolationException>(Assert.Single(failures));
        Assert.True(System.Text.RegularExpressions.Regex.IsMatch(violation.Message, cause), "The violation names its cause (" + cause + "): " + violation.Message);

        await evil.DisposeAsync();
        await Eventually.TrueAsync(() => RpcConnection.PeerMappedBytes == mapped, "the evil peer's segments are unmapped", Bound);
        await Eventually.TrueAsync(() => OpenDescriptors() <= descriptors + 2, $"the server's descriptors are back to their baseline ({descriptors}; now: {string.Join(", ", DescriptorTargets())})", Bound);
        await EchoAsync(good);
        Assert.Single(server.Listener.Connections);
    }

    [Fact]
    public async Task A_stream_producer_past_its_credit_is_disconnected()
    {
        await using PeerProcess server = PeerProcess.Start(["typed-server", Endpoints.Unique("stream-flood")]);
        string endpoint = server.WaitForLine("READY").Split(' ')[1];
        try
        {
            await using PeerProcess evil = PeerProcess.Start(["evil-client", endpoint, "typed-stream-flood"]);
            evil.WaitForLine("SENT", Bound);
            Assert.Contains("PeerDisconnectedException", evil.WaitForLine("CLOSED", Bound));
            string failed = server.WaitForLine("FAILED", Bound);
            Assert.Contains("ProtocolViolationException", failed);
            Assert.Contains("granted credit for", failed);

            // The server goes on serving streams.
            await using OffloadRpcConnection client = await OffloadRpcConnection.ConnectAsync(endpoint);
            int count = 0;
            await foreach (TestContracts.Tick tick in client.GetService<TestContracts.IFrameSource>().TicksAsync(50, "after"))
            {
                Assert.Equal(count++, tick.Index);
            }

            Assert.Equal(50, count);
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    [Theory]
    [InlineData("typed-garbage")]
    [InlineData("typed-amplify")]
    public async Task A_call_whose_arguments_do_not_decode_ends_its_connection_without_a_large_allocation(string kind)
    {
        await using PeerProcess server = PeerProcess.Start(["typed-server", Endpoints.Unique("typed-evil")]);
        string endpoint = server.WaitForLine("READY").Split(' ')[1];
        try
        {
            await using PeerProcess evil = PeerProcess.Start(["evil-client", endpoint, kind]);
            evil.WaitForLine("SENT", Bound);
            Assert.Contains("PeerDisconnectedException", evil.WaitForLine("CLOSED", Bound));
            string failed = server.WaitForLine("FAILED", Bound);
            Assert.Contains("ProtocolViolationException", failed);
            Assert.Contains("WordsAsync", failed);

            // The server goes on serving typed calls.
            await using OffloadRpcConnection client = await OffloadRpcConnection.ConnectAsync(endpoint);
            var sink = client.GetService<TestContracts.IKitchenSink>();
            Assert.Equal(["a=2"], await sink.WordsAsync(["a"], new Dictionary<string, int> { ["a"] = 2 }));
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    [Fact]
    public async Task A_peer_that_dies_cancels_its_call_running_inline_at_once()
    {
        var failures = new ConcurrentQueue<Exception>();
        var handler = new BlockUntilCancelled();
        await using var server = new InProcessServer(failures, handler: handler);
        await using PeerProcess victim = PeerProcess.Start(["client-hold", server.Endpoint, "4096"]);
        Assert.True(await handler.Started.Task.WaitAsync(Bound), "the call reached the handler");

        victim.Kill(); // the handler still blocks the poller's thread inline, waiting for its token
        Assert.True(await handler.Cancelled.Task.WaitAsync(Bound), "the dead peer's call was cancelled");
    }

    [Fact]
    public async Task Cancels_from_many_threads_at_once_all_reach_the_server()
    {
        // Six sleeping calls on an eight-slot connection are cancelled by six threads at the same instant,
        // round after round: every round, the server must see six cancellations (a lost cancel leaves a
        // handler asleep for a minute and the count short).
        await using RemoteServer server = RemoteServer.Start("cancels", "--thread-pool-dispatch", "--slots", "8");
        await using RpcConnection connection = await server.ConnectAsync(new TransportOptions { SlotCount = 8, RunContinuationsAsynchronously = true });
        const int Rounds = 25;
        const int PerRound = 6;
        int expected = await CancellationsAsync(connection);
        for (int round = 0; round < Rounds; round++)
        {
            var sources = Enumerable.Range(0, PerRound).Select(_ => new CancellationTokenSource()).ToArray();
            byte[] body = new byte[4];
            BinaryPrimitives.WriteInt32LittleEndian(body, 60_000);
            Task[] calls = sources.Select(s => connection.CallAsync(PeerMethods.Sleep, body, default, s.Token).AsTask()).ToArray();
            await Task.Delay(20);
            using var go = new Barrier(PerRound);
            await Task.WhenAll(sources.Select(s => Task.Factory.StartNew(() => { go.SignalAndWait(); s.Cancel(); }, TaskCreationOptions.LongRunning)));
            foreach (Task call in calls)
            {
                await Assert.ThrowsAnyAsync<OperationCanceledException>(() => call.WaitAsync(Bound));
            }

            expected += PerRound;
            DateTime deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
            int seen;
            while ((seen = await CancellationsAsync(connection)) < expected && DateTime.UtcNow < deadline)
            {
                await Task.Delay(20);
            }

            Assert.True(seen == expected, $"round {round}: the server saw {seen} cancellations, {expected} were sent");
        }
    }

    private static async Task<int> CancellationsAsync(RpcConnection connection)
    {
        using RpcReply stats = await connection.CallAsync(PeerMethods.Stats, default, default);
        return BinaryPrimitives.ReadInt32LittleEndian(stats.Body[20..]);
    }

    private static async Task EchoAsync(RpcConnection connection)
    {
        using RpcReply reply = await connection.CallAsync(1, "still here"u8, default).AsTask().WaitAsync(Bound);
        Assert.True(reply.Body.SequenceEqual("still here"u8));
    }

    [Fact]
    public async Task Code_that_blocks_inline_on_the_poller_does_not_hold_up_the_other_connections()
    {
        // A continuation that blocks synchronously runs on the poller (inline continuations are the
        // default); a server in the same process shares that poller. The watchdog hands the poller's
        // other connections to a new thread, so the server goes on serving while the continuation blocks.
        var failures = new ConcurrentQueue<Exception>();
        await using var server = new InProcessServer(failures);
        await using RpcConnection blocker = await server.ConnectAsync();
        await using RpcConnection other = await server.ConnectAsync();
        using var release = new ManualResetEventSlim();
        Task blocked = Task.Run(async () =>
        {
            using (RpcReply reply = await blocker.CallAsync(1, "first"u8, default))
            {
            }

            release.Wait(TimeSpan.FromSeconds(60)); // blocks whatever thread the continuation runs on: the poller
        });

        await Task.Delay(200);
        for (int i = 0; i < 100; i++)
        {
            await EchoAsync(other);
        }

        Assert.False(blocked.IsCompleted);
        release.Set();
        await blocked.WaitAsync(Bound);
        await EchoAsync(blocker);
    }

    /// <summary>Sockets and shared-memory descriptors held by this process (not the files the runtime maps as it loads assemblies).</summary>
    private static int OpenDescriptors() => DescriptorLinks().Count(t => t.StartsWith("socket:", StringComparison.Ordinal) || t.StartsWith("/memfd:", StringComparison.Ordinal));

    private static IEnumerable<string> DescriptorLinks() =>
        Directory.GetFiles("/proc/self/fd").Select(f => { try { return new FileInfo(f).LinkTarget ?? "?"; } catch (IOException) { return "?"; } });

    private static IEnumerable<string> DescriptorTargets() =>
        DescriptorLinks().Where(t => !t.EndsWith(".dll", StringComparison.Ordinal)).GroupBy(t => t.Split(':')[0]).Select(g => $"{g.Key} x{g.Count()}");

    private static int Threads() => Directory.GetDirectories("/proc/self/task").Length;

    /// <summary>A handler that blocks its (inline) thread until the call's token fires.</summary>
    private sealed class BlockUntilCancelled : IRequestHandler
    {
        public TaskCompletionSource<bool> Started { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public TaskCompletionSource<bool> Cancelled { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public ValueTask HandleAsync(IncomingCall call)
        {
            Started.TrySetResult(true);
            bool fired = call.CancellationToken.WaitHandle.WaitOne(TimeSpan.FromSeconds(90));
            Cancelled.TrySetResult(fired);
            return ValueTask.CompletedTask;
        }
    }
}
