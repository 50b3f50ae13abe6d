using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// Headers, deadlines, interceptors on both sides, traces, metrics and logging, between this process and
/// a server process (tests/OffloadRpc.TestPeer probe-server) that reports what it saw.
/// </summary>
public sealed class CallPipelineTests : IAsyncLifetime
{
    private PeerProcess _server = null!;
    private string _endpoint = null!;

    public Task InitializeAsync()
    {
        _endpoint = Endpoints.Unique("probe");
        _server = PeerProcess.Start(["probe-server", _endpoint, "--traces"]);
        _server.WaitForLine("READY");
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _server.DisposeAsync();
        Endpoints.RemoveStale(_endpoint);
    }

    private async Task<OffloadRpcConnection> ConnectAsync(Action<OffloadRpcOptions>? configure = null)
    {
        var options = new OffloadRpcOptions();
        configure?.Invoke(options);
        return await OffloadRpcConnection.ConnectAsync(_endpoint, options);
    }

    [Fact]
    public async Task Headers_set_for_a_scope_and_by_a_client_interceptor_reach_the_server_method()
    {
        await using OffloadRpcConnection connection = await ConnectAsync(o => o.ClientInterceptors.Add(new HeaderAddingInterceptor()));
        ICallProbe probe = connection.GetService<ICallProbe>();

        Assert.Equal(["added-by=client-interceptor"], await probe.HeadersAsync());
        using (OffloadCallScope.Begin().WithHeader("tenant", "acme").WithHeader("ünïcode", "välue ✓"))
        {
            Assert.Equal(["added-by=client-interceptor", "tenant=acme", "ünïcode=välue ✓"], await probe.HeadersAsync());
            using (OffloadCallScope.Begin().WithHeader("tenant", "inner"))
            {
                Assert.Equal(["added-by=client-interceptor", "tenant=inner", "ünïcode=välue ✓"], await probe.HeadersAsync());
            }

            Assert.Equal(["added-by=client-interceptor", "tenant=acme", "ünïcode=välue ✓"], await probe.HeadersAsync());
        }

        Assert.Equal(["added-by=client-interceptor"], await probe.HeadersAsync());

        await using OffloadRpcConnection plain = await ConnectAsync();
        Assert.Empty(await plain.GetService<ICallProbe>().HeadersAsync());
        using (OffloadCallScope.Begin().WithHeader("only", "scope"))
        {
            Assert.Equal(["only=scope"], await plain.GetService<ICallProbe>().HeadersAsync());
        }
    }

    [Fact]
    public async Task Past_its_deadline_a_call_fails_with_DeadlineExceededException_and_the_servers_token_fires()
    {
        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
        {
            DeadlineExceededException exceeded = await Assert.ThrowsAsync<DeadlineExceededException>(async () => await probe.WaitForCancelAsync(60_000));
            Assert.IsAssignableFrom<TimeoutException>(exceeded);
            Assert.Equal("/OffloadRpc.TestContracts.ICallProbe/WaitForCancelAsync", exceeded.Method);
        }

        await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "cancelled deadline=yes", "the server's token fired for the call, which knew its deadline");
        Assert.Contains("intercepted WaitForCancelAsync failed TaskCanceledException", await probe.ServerLogAsync()); // the server interceptor saw the method's exception

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromSeconds(30)))
        {
            Assert.Equal("completed", await probe.WaitForCancelAsync(1)); // within its deadline a call completes
        }

        Assert.Equal("completed", await probe.LastOutcomeAsync());

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.MaxValue))
        {
            Assert.Equal("completed", await probe.WaitForCancelAsync(1)); // a deadline beyond any timer's reach travels and arms none
        }
    }

    [Fact]
    public async Task The_server_ends_a_call_at_its_deadline_by_itself_when_the_caller_never_cancels_it()
    {
        await using (PeerProcess caller = PeerProcess.Start(["probe-deadline-only", _endpoint, "300"]))
        {
            Assert.Equal("REPLY fault System.Threading.Tasks.TaskCanceledException", caller.WaitForLine("REPLY")); // long before the method's minute
        }

        await using OffloadRpcConnection connection = await ConnectAsync();
        Assert.Equal("cancelled deadline=yes", await connection.GetService<ICallProbe>().LastOutcomeAsync());
    }

    /// <summary>
    /// The server reuses a call's cancellation source for the connection's next call when it never fired (its
    /// deadline timer stopped first): one armed for an earlier call, or one that fired, must not reach a later call.
    /// </summary>
    [Fact]
    public async Task A_deadline_or_a_cancellation_of_one_call_never_reaches_a_later_call_on_the_connection()
    {
        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();

        // Calls four at a time, so that every request object the server pools for the connection serves some.
        for (int round = 0; round < 3; round++)
        {
            using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
            {
                string[] quick = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => probe.WaitForCancelAsync(1).AsTask())); // each arms a timer, stopped when it completes
                Assert.All(quick, outcome => Assert.Equal("completed", outcome));
            }
        }

        string[] later = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => probe.WaitForCancelAsync(1500).AsTask()));
        Assert.All(later, outcome => Assert.Equal("completed", outcome)); // no deadline: nothing fires at 300 ms

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(300)))
        {
            await Assert.ThrowsAsync<DeadlineExceededException>(async () => await probe.WaitForCancelAsync(60_000)); // a reused source arms its timer again
        }

        await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "cancelled deadline=yes", "the server's token fired at the deadline");
        Assert.Equal("completed", await probe.WaitForCancelAsync(500)); // the source that fired is not reused

        using (var cts = new CancellationTokenSource())
        {
            Task<string> cancelled = probe.WaitForCancelAsync(60_000, cts.Token).AsTask();
            await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "waiting", "the call is being served");
            await cts.CancelAsync();
            Assert.IsAssignableFrom<OperationCanceledException>(await Record.ExceptionAsync(() => cancelled));
        }

        await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "cancelled deadline=no", "the caller's cancellation reached the method");
        Assert.Equal("completed", await probe.WaitForCancelAsync(500)); // nor is one the caller cancelled
    }

    [Fact]
    public async Task The_options_default_deadline_applies_to_calls_without_one()
    {
        await using OffloadRpcConnection connection = await ConnectAsync(o => o.DefaultDeadline = TimeSpan.FromMilliseconds(300));
        ICallProbe probe = connection.GetService<ICallProbe>();
        await Assert.ThrowsAsync<DeadlineExceededException>(async () => await probe.WaitForCancelAsync(60_000));
        await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "cancelled deadline=yes", "the server's token fired");

        using var cts = new CancellationTokenSource();
        Task<string> cancelled = probe.WaitForCancelAsync(60_000, cts.Token).AsTask();
        cts.Cancel(); // the caller's own cancellation stays an OperationCanceledException
        Exception failure = await Record.ExceptionAsync(() => cancelled);
        Assert.IsAssignableFrom<OperationCanceledException>(failure);
    }

    [Fact]
    public async Task A_client_interceptor_sees_the_call_and_can_short_circuit_it_without_reaching_the_server()
    {
        var recorder = new RecordingInterceptor();
        await using OffloadRpcConnection connection = await ConnectAsync(o =>
        {
            o.ClientInterceptors.Add(recorder);
            o.ClientInterceptors.Add(new ShortCircuitInterceptor());
        });
        ICallProbe probe = connection.GetService<ICallProbe>();

        byte[] data = new byte[100_000];
        Checksum64.Fill(data, 5);
        Assert.Equal(Checksum64.Compute(data), await probe.ChecksumAsync(data));
        Assert.Contains($"ChecksumAsync payload=100000 count=1 result={Checksum64.Compute(data)}", recorder.Lines);
        Assert.Contains("OffloadRpc.TestContracts.ICallProbe /OffloadRpc.TestContracts.ICallProbe/ChecksumAsync", recorder.Lines); // the service and method

        Assert.Equal("short-circuited", await probe.InstanceAsync()); // never sent
        Assert.Contains("InstanceAsync payload=0 count=0 result=short-circuited", recorder.Lines);

        string[] serverLog = await probe.ServerLogAsync();
        Assert.Contains(serverLog, l => l.StartsWith("intercepted ChecksumAsync request=", StringComparison.Ordinal) && l.Contains("+100000 ", StringComparison.Ordinal));
        Assert.DoesNotContain(serverLog, l => l.StartsWith("intercepted InstanceAsync", StringComparison.Ordinal));

        using (OffloadCallScope.Begin().WithHeader("deny", "client-side"))
        {
            var refused = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await probe.ChecksumAsync(data));
            Assert.Contains("RemoteInvocationException", recorder.Lines.Last(), StringComparison.Ordinal); // the interceptor saw the exception
        }
    }

    [Fact]
    public async Task A_server_interceptor_sees_the_typed_result_and_can_refuse_a_call_or_answer_it_itself()
    {
        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();

        using (OffloadCallScope.Begin().WithHeader("deny", "no tenant"))
        {
            RemoteInvocationException refused = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await probe.InstanceAsync());
            Assert.Equal("System.UnauthorizedAccessException", refused.RemoteExceptionType);
            Assert.Contains("denied: no tenant (/OffloadRpc.TestContracts.ICallProbe/InstanceAsync of OffloadRpc.TestContracts.ICallProbe)", refused.Message); // the interceptor saw the service and method
        }

        using (OffloadCallScope.Begin().WithHeader("skip", "PingAsync"))
        {
            await probe.PingAsync();
        }

        // A cache: the interceptor answers with a result of its own; the method (and its per-call implementation) never runs.
        int before = int.Parse((await probe.InstanceAsync()).Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        using (OffloadCallScope.Begin().WithHeader("skip", "InstanceAsync").WithHeader("cached", "from the cache"))
        {
            Assert.Equal("from the cache", await probe.InstanceAsync());
        }

        int after = int.Parse((await probe.InstanceAsync()).Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        Assert.Equal(before + 1, after);

        Assert.True(connection.IsConnected); // a refusal is an answer, not a protocol violation
        byte[] data = new byte[4096];
        Checksum64.Fill(data, 9);
        Assert.Equal(Checksum64.Compute(data), await probe.ChecksumAsync(data));
        string[] serverLog = await probe.ServerLogAsync();
        Assert.Contains("denied InstanceAsync no tenant", serverLog);
        Assert.Contains("skipped PingAsync", serverLog);
        Assert.Contains("skipped InstanceAsync", serverLog);
        Assert.Contains(serverLog, l => l.StartsWith("intercepted ChecksumAsync request=", StringComparison.Ordinal) && l.EndsWith($"+4096 result={Checksum64.Compute(data)} ok", StringComparison.Ordinal)); // the typed result
    }

    [Fact]
    public async Task Streamed_calls_carry_headers_to_the_server_method_and_client_interceptors_see_them()
    {
        var recorder = new StreamRecordingInterceptor();
        await using OffloadRpcConnection connection = await ConnectAsync(o => o.ClientInterceptors.Add(recorder));
        ICallProbe probe = connection.GetService<ICallProbe>();
        ulong[][] chunks = [new ulong[9_000], new ulong[1], new ulong[40_000]];
        for (int i = 0; i < chunks.Length; i++)
        {
            Checksum64.Fill(MemoryMarshal.AsBytes(chunks[i].AsSpan()), (ulong)(20 + i));
        }

        const string Headers = "headers=added-by=stream-interceptor;tenant=acme";
        using (OffloadCallScope.Begin().WithHeader("tenant", "acme"))
        {
            List<string> watched = await ToListAsync(probe.WatchAsync(3, 0));
            Assert.Equal(["0 ", "1 ", "2 "], watched.Select(w => w[..2]));
            Assert.All(watched, w => Assert.Contains($" {Headers} deadline=no ", w, StringComparison.Ordinal));

            List<string> sums = await ToListAsync(probe.ChecksumEachAsync(Produce(chunks)));
            Assert.Equal(chunks.Select(c => $"{Checksum64.Compute(MemoryMarshal.AsBytes(c.AsSpan()))} {Headers}"), sums);

            ulong[] all = [.. chunks.SelectMany(c => c)];
            Assert.Equal($"{Checksum64.Compute(MemoryMarshal.AsBytes(all.AsSpan()))} headers=tenant=acme", await probe.ChecksumAllAsync(Produce(chunks)));

            using (OffloadCallScope.Begin().WithHeader("client-cached", "yes"))
            {
                Assert.Equal(["from the client interceptor"], await ToListAsync(probe.WatchAsync(3, 0))); // never sent
            }
        }

        Assert.Contains("WatchAsync items=3", recorder.Lines);
        Assert.Contains("ChecksumEachAsync items=3", recorder.Lines);
        Assert.Single(await probe.ServerLogAsync(), l => l.StartsWith("watch ran", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_server_interceptor_sees_each_streamed_item_and_can_answer_a_stream_itself()
    {
        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();
        using (OffloadCallScope.Begin().WithHeader("tenant", "acme"))
        {
            Assert.Equal(3, (await ToListAsync(probe.WatchAsync(3, 0))).Count);
            using (OffloadCallScope.Begin().WithHeader("stream-cached", "a,b"))
            {
                Assert.Equal(["a", "b"], await ToListAsync(probe.WatchAsync(3, 0)));
            }

            using (OffloadCallScope.Begin().WithHeader("deny", "streams too"))
            {
                RemoteInvocationException refused = await Assert.ThrowsAsync<RemoteInvocationException>(() => ToListAsync(probe.WatchAsync(3, 0)));
                Assert.Equal("System.UnauthorizedAccessException", refused.RemoteExceptionType);
            }
        }

        string[] serverLog = await probe.ServerLogAsync();
        Assert.Contains(serverLog, l => l.StartsWith("stream item WatchAsync 2 headers=tenant=acme", StringComparison.Ordinal));
        Assert.Contains("stream ended WatchAsync items=3 tenant=acme", serverLog);
        Assert.Contains("stream cached WatchAsync", serverLog);
        Assert.Single(serverLog, l => l.StartsWith("watch ran", StringComparison.Ordinal)); // the cached and the refused never ran the method
    }

    [Fact]
    public async Task Past_its_deadline_a_streamed_call_fails_with_DeadlineExceededException_and_the_producers_token_fires()
    {
        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();
        var received = new List<string>();
        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(400)))
        {
            DeadlineExceededException exceeded = await Assert.ThrowsAsync<DeadlineExceededException>(async () =>
            {
                await foreach (string item in probe.WatchAsync(50, 100))
                {
                    received.Add(item);
                }
            });
            Assert.Equal("/OffloadRpc.TestContracts.ICallProbe/WatchAsync", exceeded.Method);
        }

        Assert.NotEmpty(received); // the items before the deadline arrived
        Assert.Contains(" deadline=yes ", received[0], StringComparison.Ordinal);
        await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "stream cancelled deadline=yes", "the producer's enumeration token fired at the deadline");

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromSeconds(30)))
        {
            Assert.Equal(2, (await ToListAsync(probe.WatchAsync(2, 1))).Count); // within its deadline a stream completes
        }

        Assert.Equal("stream completed", await probe.LastOutcomeAsync());
    }

    [Fact]
    public async Task Client_and_server_spans_share_the_trace_id_and_calls_are_measured_on_both_sides()
    {
        using var telemetry = new TelemetryRecorder("CallPipelineTests");

        await using OffloadRpcConnection connection = await ConnectAsync();
        ICallProbe probe = connection.GetService<ICallProbe>();
        using var source = new ActivitySource("CallPipelineTests");
        string seen;
        ActivityTraceId rootTrace;
        using (Activity root = source.StartActivity("root")!)
        {
            rootTrace = root.TraceId;
            seen = await probe.TraceAsync();
        }

        Activity client = telemetry.Spans.Single(a => a.Kind == ActivityKind.Client && a.DisplayName == "OffloadRpc.TestContracts.ICallProbe/TraceAsync");

        string[] server = seen.Split(' ');
        string streamed;
        using (Activity root = source.StartActivity("root-of-a-stream")!)
        {
            streamed = (await ToListAsync(probe.WatchAsync(2, 0)))[1];
            Assert.Contains($" trace={root.TraceId} ", streamed, StringComparison.Ordinal);
        }

        Activity streamClient = telemetry.Spans.Single(a => a.Kind == ActivityKind.Client && a.DisplayName == "OffloadRpc.TestContracts.ICallProbe/WatchAsync");

        Assert.EndsWith($" trace={streamClient.TraceId} {streamClient.SpanId}", streamed, StringComparison.Ordinal); // the server span of a stream is its client span's child
        Assert.Equal("ok", streamClient.GetTagItem("rpc.offloadrpc.status_code"));
        await using (IAsyncEnumerator<string> left = probe.WatchAsync(100, 10).GetAsyncEnumerator())
        {
            Assert.True(await left.MoveNextAsync()); // then the consumer leaves early
        }

        Assert.Equal(rootTrace.ToString(), server[0]); // one trace across both processes
        Assert.Equal(client.TraceId.ToString(), server[0]);
        Assert.Equal(client.SpanId.ToString(), server[1]); // the server span is the client span's child
        Assert.Equal("offloadrpc", client.GetTagItem("rpc.system"));
        Assert.Equal("OffloadRpc.TestContracts.ICallProbe", client.GetTagItem("rpc.service"));
        Assert.Equal("TraceAsync", client.GetTagItem("rpc.method"));
        Assert.Equal("ok", client.GetTagItem("rpc.offloadrpc.status_code"));

        await Eventually.TrueAsync(async () => (await probe.ServerLogAsync()).Any(l => l.StartsWith($"span Server OffloadRpc.TestContracts.ICallProbe/TraceAsync {rootTrace} parent={client.SpanId} system=offloadrpc method=TraceAsync status=ok", StringComparison.Ordinal)), "the server process recorded its span");
        string[] serverLog = await probe.ServerLogAsync();
        Assert.Contains("metric rpc.server.duration TraceAsync ok", serverLog);
        Assert.Contains("metric offloadrpc.server.calls.started TraceAsync", serverLog);
        Assert.Contains("metric offloadrpc.server.calls.completed TraceAsync ok", serverLog);
        Assert.Contains("metric offloadrpc.server.active_calls TraceAsync", serverLog);
        Assert.Contains(serverLog, l => l.StartsWith($"span Server OffloadRpc.TestContracts.ICallProbe/WatchAsync {streamClient.TraceId} parent={streamClient.SpanId} system=offloadrpc method=WatchAsync status=ok", StringComparison.Ordinal));
        Assert.Contains("metric rpc.server.duration WatchAsync ok", serverLog);

        using (var cts = new CancellationTokenSource())
        {
            Task<string> waiting = probe.WaitForCancelAsync(60_000, cts.Token).AsTask();
            await Eventually.TrueAsync(async () => await probe.LastOutcomeAsync() == "waiting", "the call is being served");
            Assert.Equal(1, telemetry.Sum("offloadrpc.client.active_calls", "rpc.method", "WaitForCancelAsync")); // in flight
            await cts.CancelAsync();
            await Record.ExceptionAsync(() => waiting);
            Assert.Equal(0, telemetry.Sum("offloadrpc.client.active_calls", "rpc.method", "WaitForCancelAsync")); // over
        }

        using (OffloadCallScope.Begin().WithDeadline(TimeSpan.FromMilliseconds(200)))
        {
            await Assert.ThrowsAsync<DeadlineExceededException>(async () => await probe.WaitForCancelAsync(60_000));
        }

        byte[] big = new byte[1 << 20];
        await probe.ChecksumAsync(big);
        string[] measurements = telemetry.Measurements("rpc.method", "rpc.offloadrpc.status_code");
        Assert.Contains("rpc.client.duration TraceAsync ok", measurements);
        Assert.Contains("offloadrpc.client.calls.started TraceAsync", measurements);
        Assert.Contains("offloadrpc.client.calls.completed TraceAsync ok", measurements);
        Assert.Contains("offloadrpc.client.active_calls TraceAsync", measurements);
        Assert.Contains("offloadrpc.client.calls.completed WaitForCancelAsync deadline_exceeded", measurements);
        Assert.Contains("rpc.client.duration WatchAsync ok", measurements);
        Assert.Contains("offloadrpc.client.calls.completed WatchAsync cancelled", measurements); // the consumer that left early
        Assert.Contains("offloadrpc.client.active_calls WatchAsync", measurements);
        Assert.Contains("offloadrpc.transfer.bytes", measurements);
        Assert.Contains("offloadrpc.arena.bytes_in_use", measurements);
        Assert.Contains("offloadrpc.connections", measurements);
        Assert.Contains("offloadrpc.transfers", measurements);

        using (SharedBuffer held = connection.Rent(3 << 20))
        {
            Assert.True(telemetry.Observe("offloadrpc.arena.bytes_in_use", "offloadrpc.role", "client") >= 3 << 20, "a lease held counts as arena bytes in use");
            Assert.True(telemetry.Observe("offloadrpc.connections", "offloadrpc.role", "client") >= 1, "the open connection is counted");
        }
    }

    [Fact]
    public async Task Nothing_is_logged_per_call_at_Information_or_above_on_either_side()
    {
        var serverLogs = new CollectingLoggerFactory();
        var clientLogs = new CollectingLoggerFactory();
        var gated = new GatedProbe();
        string endpoint = Endpoints.Unique("quiet");
        var serverOptions = new OffloadRpcOptions { LoggerFactory = serverLogs, SlowCallThreshold = TimeSpan.FromMinutes(5) }; // slow calls are logged; these are ordinary ones
        serverOptions.ServerInterceptors.Add(new DenyingInterceptor());
        await using var server = new OffloadRpcServer(endpoint, serverOptions);
        server.Register<ICallProbe>(gated);
        await server.StartAsync();
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint, new OffloadRpcOptions { LoggerFactory = clientLogs, SlowCallThreshold = TimeSpan.FromMinutes(5) });
        ICallProbe probe = connection.GetService<ICallProbe>();
        await probe.PingAsync();
        await Eventually.TrueAsync(() => serverLogs.Has("ConnectionAccepted") && clientLogs.Has("Connected"), "the connection is logged on both sides");
        int serverBefore = serverLogs.Entries.Count(e => e.Level >= LogLevel.Information);
        int clientBefore = clientLogs.Entries.Count(e => e.Level >= LogLevel.Information);

        byte[] data = new byte[256 << 10];
        Checksum64.Fill(data, 3);
        for (int i = 0; i < 50; i++)
        {
            Assert.Equal(Checksum64.Compute(data), await probe.ChecksumAsync(data)); // ok, with a payload
        }

        using (OffloadCallScope.Begin().WithHeader("tenant", "acme").WithDeadline(TimeSpan.FromMilliseconds(200)))
        {
            await Assert.ThrowsAsync<DeadlineExceededException>(async () => await probe.WaitForCancelAsync(1)); // deadline exceeded
        }

        using (var cts = new CancellationTokenSource())
        {
            Task<string> cancelled = probe.WaitForCancelAsync(2, cts.Token).AsTask();
            await gated.WaitEnteredAsync(2);
            await cts.CancelAsync();
            Assert.IsAssignableFrom<OperationCanceledException>(await Record.ExceptionAsync(() => cancelled)); // cancelled by the caller
        }

        using (OffloadCallScope.Begin().WithHeader("deny", "yes"))
        {
            await Assert.ThrowsAsync<RemoteInvocationException>(async () => await probe.PingAsync()); // refused by an interceptor
        }

        Assert.Empty(await ToListAsync(probe.WatchAsync(3, 0))); // a streamed result
        await Eventually.TrueAsync(() => gated.Outcomes.Contains("cancelled 1") && gated.Outcomes.Contains("cancelled 2"), "both waiting calls ended on the server");

        Assert.Equal(serverBefore, serverLogs.Entries.Count(e => e.Level >= LogLevel.Information));
        Assert.Equal(clientBefore, clientLogs.Entries.Count(e => e.Level >= LogLevel.Information));
    }

    /// <summary>Refuses calls carrying a "deny" header.</summary>
    private sealed class DenyingInterceptor : ServerInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ServerInterceptorContext context, ServerCallContinuation<TResult> continuation) =>
            context.RequestHeaders.ContainsKey("deny") ? throw new UnauthorizedAccessException("denied") : continuation(context);
    }

    [Fact]
    public async Task A_slow_call_of_a_service_with_nothing_around_it_is_logged_and_an_ordinary_one_is_not()
    {
        // One implementation, no interceptors: the dispatcher runs the stub directly, timing the call only for this log.
        foreach ((TimeSpan threshold, bool logged) in new[] { (TimeSpan.Zero, true), (TimeSpan.FromMinutes(5), false) })
        {
            var logs = new CollectingLoggerFactory();
            string endpoint = Endpoints.Unique("slow");
            await using var server = new OffloadRpcServer(endpoint, new OffloadRpcOptions { LoggerFactory = logs, SlowCallThreshold = threshold });
            server.Register<ICallProbe>(new LocalProbe());
            await server.StartAsync();
            await using (PeerProcess good = PeerProcess.Start(["probe-call", endpoint]))
            {
                good.WaitForLine("OK");
            }

            await Eventually.TrueAsync(() => logs.Has("PeerDisconnected"), "the client process's going away is logged");
            Assert.Equal(logged, logs.Has("SlowCall", "ChecksumAsync"));
        }
    }

    [Fact]
    public async Task A_refused_client_and_a_protocol_violation_are_logged_by_the_server()
    {
        var logs = new CollectingLoggerFactory();
        string endpoint = Endpoints.Unique("logged");
        var options = new OffloadRpcOptions { LoggerFactory = logs, SlowCallThreshold = TimeSpan.Zero };
        await using var server = new OffloadRpcServer(endpoint, options);
        server.Register<ICallProbe>(_ => new LocalProbe());
        await server.StartAsync();

        await using (PeerProcess refused = PeerProcess.Start(["client", endpoint, "--version", "99"]))
        {
            refused.WaitForLine("REFUSED");
        }

        await Eventually.TrueAsync(() => logs.Has("ConnectionRefused", "version"), "the refusal and its reason are logged");

        await using (PeerProcess good = PeerProcess.Start(["probe-call", endpoint]))
        {
            good.WaitForLine("OK");
        }

        await Eventually.TrueAsync(() => logs.Has("ConnectionAccepted") && logs.Has("SlowCall", "ChecksumAsync"), "an accepted connection and (threshold zero) a slow call are logged");

        await Eventually.TrueAsync(() => logs.Has("PeerDisconnected"), "the client process's going away is logged");

        await using (PeerProcess evil = PeerProcess.Start(["evil-client", endpoint, "typed-bad-metadata"]))
        {
            Assert.Contains("PeerDisconnectedException", evil.WaitForLine("CLOSED"));
        }

        await Eventually.TrueAsync(() => logs.Has("ProtocolViolation", "metadata block does not decode"), "the protocol violation is logged");
        Assert.DoesNotContain(logs.Entries, e => e.Level == LogLevel.Information && e.EventName == "SlowCall");
    }

    [Fact]
    public async Task StopAsync_returns_once_the_last_call_in_flight_has_answered_without_waiting_for_its_token()
    {
        var logs = new CollectingLoggerFactory();
        var probe = new GatedProbe();
        string endpoint = Endpoints.Unique("drain");
        await using OffloadRpcServer server = await StartLocalAsync(endpoint, logs, probe);
        await using OffloadRpcConnection first = await OffloadRpcConnection.ConnectAsync(endpoint);
        await using OffloadRpcConnection second = await OffloadRpcConnection.ConnectAsync(endpoint);
        Task<string> one = first.GetService<ICallProbe>().WaitForCancelAsync(1).AsTask();
        Task<string> two = second.GetService<ICallProbe>().WaitForCancelAsync(2).AsTask();
        await probe.WaitEnteredAsync(1);
        await probe.WaitEnteredAsync(2);

        using var never = new CancellationTokenSource(); // the host's shutdown timeout, far away
        Task stop = server.StopAsync(never.Token);
        await Eventually.TrueAsync(() => logs.Has("ServerStopping", "2 calls in flight"), "the server stops accepting and waits for both calls");
        Assert.False(server.IsListening);

        probe.Release(1);
        Assert.Equal("completed 1", await one.WaitAsync(TimeSpan.FromSeconds(30)));
        await Assert.ThrowsAsync<TimeoutException>(() => stop.WaitAsync(TimeSpan.FromMilliseconds(200))); // the other connection still serves a call

        probe.Release(2);
        await stop.WaitAsync(TimeSpan.FromSeconds(30)); // woken by the last call's end: the token never fires
        Assert.Equal("completed 2", await two.WaitAsync(TimeSpan.FromSeconds(30))); // answered before the connections closed
        Assert.Equal(0, server.CallsInFlight);
        Assert.False(never.IsCancellationRequested);
        Assert.Equal(["completed 1", "completed 2"], probe.Outcomes);
        Assert.DoesNotContain(logs.Entries, e => e.EventName == "ServerCancellingCalls");
    }

    [Fact]
    public async Task StopAsync_cancels_the_calls_still_running_when_its_token_fires()
    {
        var logs = new CollectingLoggerFactory();
        var probe = new GatedProbe();
        string endpoint = Endpoints.Unique("drain-cancel");
        await using OffloadRpcServer server = await StartLocalAsync(endpoint, logs, probe);
        await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
        Task<string> call = connection.GetService<ICallProbe>().WaitForCancelAsync(1).AsTask();
        await probe.WaitEnteredAsync(1);

        using var timeout = new CancellationTokenSource();
        Task stop = server.StopAsync(timeout.Token);
        await Eventually.TrueAsync(() => logs.Has("ServerStopping", "1 calls in flight"), "the server waits for the call");
        await Assert.ThrowsAsync<TimeoutException>(() => stop.WaitAsync(TimeSpan.FromMilliseconds(200))); // nothing ends the call but the token

        await timeout.CancelAsync();
        await stop.WaitAsync(TimeSpan.FromSeconds(30));
        await Assert.ThrowsAsync<PeerDisconnectedException>(() => call.WaitAsync(TimeSpan.FromSeconds(30)));
        await Eventually.TrueAsync(() => probe.Outcomes.Contains("cancelled 1"), "the method's token fired");
        Assert.True(logs.Has("ServerCancellingCalls", "1 calls"));
    }

    private static async Task<OffloadRpcServer> StartLocalAsync(string endpoint, CollectingLoggerFactory logs, ICallProbe probe)
    {
        var server = new OffloadRpcServer(endpoint, new OffloadRpcOptions { LoggerFactory = logs });
        server.Register(probe);
        await server.StartAsync();
        return server;
    }

    /// <summary>WaitForCancelAsync(n) waits until the test releases n (answers "completed n") or the call's token fires ("cancelled n").</summary>
    private sealed class GatedProbe : ICallProbe
    {
        private readonly System.Collections.Concurrent.ConcurrentDictionary<int, (TaskCompletionSource Entered, TaskCompletionSource Release)> _gates = new();
        private readonly System.Collections.Concurrent.ConcurrentQueue<string> _outcomes = new();

        public string[] Outcomes => [.. _outcomes];

        public Task WaitEnteredAsync(int id) => Gate(id).Entered.Task.WaitAsync(TimeSpan.FromSeconds(30));

        public void Release(int id) => Gate(id).Release.TrySetResult();

        public async ValueTask<string> WaitForCancelAsync(int milliseconds, CancellationToken ct = default)
        {
            (TaskCompletionSource entered, TaskCompletionSource release) = Gate(milliseconds);
            entered.TrySetResult();
            string outcome;
            try
            {
                await release.Task.WaitAsync(ct);
                outcome = $"completed {milliseconds}";
            }
            catch (OperationCanceledException)
            {
                _outcomes.Enqueue($"cancelled {milliseconds}");
                throw;
            }

            _outcomes.Enqueue(outcome);
            return outcome;
        }

        private (TaskCompletionSource Entered, TaskCompletionSource Release) Gate(int id) =>
            _gates.GetOrAdd(id, _ => (new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously), new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)));

        public ValueTask<string[]> HeadersAsync(CancellationToken ct = default) => ValueTask.FromResult(Array.Empty<string>());

        public ValueTask<string> LastOutcomeAsync(CancellationToken ct = default) => ValueTask.FromResult(_outcomes.LastOrDefault() ?? "none");

        public ValueTask<string> TraceAsync(CancellationToken ct = default) => ValueTask.FromResult("none");

        public ValueTask<string> InstanceAsync(CancellationToken ct = default) => ValueTask.FromResult("gated");

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(data.Span));

        public ValueTask<string[]> ServerLogAsync(CancellationToken ct = default) => ValueTask.FromResult(Outcomes);

        public ValueTask PingAsync(CancellationToken ct = default) => ValueTask.CompletedTask;

        public IAsyncEnumerable<string> WatchAsync(int count, int delayMs, CancellationToken ct = default) => AsyncEnumerable.Empty<string>();

        public IAsyncEnumerable<string> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default) => AsyncEnumerable.Empty<string>();

        public ValueTask<string> ChecksumAllAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default) => ValueTask.FromResult("gated");
    }

    private sealed class LocalProbe : ICallProbe
    {
        public ValueTask<string[]> HeadersAsync(CancellationToken ct = default) => ValueTask.FromResult(Array.Empty<string>());

        public ValueTask<string> WaitForCancelAsync(int milliseconds, CancellationToken ct = default) => ValueTask.FromResult("completed");

        public ValueTask<string> LastOutcomeAsync(CancellationToken ct = default) => ValueTask.FromResult("none");

        public ValueTask<string> TraceAsync(CancellationToken ct = default) => ValueTask.FromResult("none");

        public ValueTask<string> InstanceAsync(CancellationToken ct = default) => ValueTask.FromResult("local");

        public ValueTask<ulong> ChecksumAsync(ReadOnlyMemory<byte> data, CancellationToken ct = default) => ValueTask.FromResult(Checksum64.Compute(data.Span));

        public ValueTask<string[]> ServerLogAsync(CancellationToken ct = default) => ValueTask.FromResult(Array.Empty<string>());

        public ValueTask PingAsync(CancellationToken ct = default) => ValueTask.CompletedTask;

        public IAsyncEnumerable<string> WatchAsync(int count, int delayMs, CancellationToken ct = default) => AsyncEnumerable.Empty<string>();

        public IAsyncEnumerable<string> ChecksumEachAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default) => AsyncEnumerable.Empty<string>();

        public ValueTask<string> ChecksumAllAsync(IAsyncEnumerable<ReadOnlyMemory<ulong>> chunks, CancellationToken ct = default) => ValueTask.FromResult("local");
    }

    private static async Task<List<T>> ToListAsync<T>(IAsyncEnumerable<T> items)
    {
        var list = new List<T>();
        await foreach (T item in items)
        {
            list.Add(item);
        }

        return list;
    }

    private static async IAsyncEnumerable<ReadOnlyMemory<ulong>> Produce(ulong[][] chunks)
    {
        foreach (ulong[] chunk in chunks)
        {
            await Task.Yield();
            yield return chunk;
        }
    }

    /// <summary>Adds a header to streamed calls, counts their items, and answers a "client-cached" one itself.</summary>
    private sealed class StreamRecordingInterceptor : ClientInterceptor
    {
        public List<string> Lines { get; } = [];

        public override async IAsyncEnumerable<TItem> InterceptStream<TItem>(ClientInterceptorContext context, ClientStreamContinuation<TItem> continuation)
        {
            context.RequestHeaders["added-by"] = "stream-interceptor";
            if (context.RequestHeaders.ContainsKey("client-cached") && typeof(TItem) == typeof(string))
            {
                yield return (TItem)(object)"from the client interceptor";
                yield break;
            }

            int count = 0;
            await foreach (TItem item in continuation(context))
            {
                count++;
                yield return item;
            }

            lock (Lines)
            {
                Lines.Add($"{context.MethodName} items={count}");
            }
        }
    }

    private sealed class HeaderAddingInterceptor : ClientInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
        {
            context.RequestHeaders["added-by"] = "client-interceptor";
            return continuation(context);
        }
    }

    private sealed class RecordingInterceptor : ClientInterceptor
    {
        public List<string> Lines { get; } = [];

        public override async ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
        {
            try
            {
                TResult result = await continuation(context);
                Lines.Add($"{context.ServiceName} {context.FullName}");
                Lines.Add($"{context.MethodName} payload={context.RequestPayloadBytes} count={context.RequestPayloadCount} result={result}");
                return result;
            }
            catch (Exception ex)
            {
                Lines.Add($"{context.MethodName} failed {ex.GetType().Name}");
                throw;
            }
        }
    }

    private sealed class ShortCircuitInterceptor : ClientInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation) =>
            context.MethodName == nameof(ICallProbe.InstanceAsync) && typeof(TResult) == typeof(string)
                ? ValueTask.FromResult((TResult)(object)"short-circuited")
                : continuation(context);
    }
}
