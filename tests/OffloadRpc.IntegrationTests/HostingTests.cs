using System.Diagnostics;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Diagnostics.HealthChecks;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using OpenTelemetry;
using OpenTelemetry.Trace;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// OffloadRpc.Hosting across two processes: a Generic Host serving ICallProbe (tests/OffloadRpc.TestPeer
/// hosted-server) and clients from a service collection in this process.
/// </summary>
public sealed class HostingTests
{
    private static ServiceProvider Client(string endpoint, Action<OffloadRpcOptions>? configure = null)
    {
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddOffloadRpcClient<ICallProbe>(endpoint, configure).AddInterceptor<TenantInterceptor>();
        services.AddSingleton(new TenantInterceptor.Tenant("from-di"));
        services.AddHealthChecks().AddOffloadRpcClient(endpoint);
        return services.BuildServiceProvider();
    }

    private static PeerProcess StartHosted(string endpoint, params string[] extra)
    {
        PeerProcess server = PeerProcess.Start(["hosted-server", endpoint, .. extra]);
        server.WaitForLine("READY");
        Assert.Equal("HEALTH Healthy", server.WaitForLine("HEALTH")); // the server's health check once started
        return server;
    }

    [Fact]
    public async Task A_hosted_server_resolves_each_call_in_its_own_scope_and_runs_interceptors_from_DI_on_both_sides()
    {
        string endpoint = Endpoints.Unique("hosted");
        await using PeerProcess server = StartHosted(endpoint);
        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();
        Assert.Same(probe, client.GetRequiredService<ICallProbe>());

        string[] first = (await probe.InstanceAsync()).Split(' ');
        string[] second = (await probe.InstanceAsync()).Split(' ');
        Assert.Equal(2, first.Length); // not disposed while the call ran
        Assert.NotEqual(first[0], second[0]); // a new implementation per call
        Assert.NotEqual(first[1], second[1]); // and a new scoped dependency
        string[] log = await probe.ServerLogAsync();
        Assert.Contains($"disposed dependency {first[1]}", log); // the call's scope was disposed with it
        Assert.Contains(log, l => l.StartsWith("intercepted InstanceAsync", StringComparison.Ordinal)); // the server interceptor from DI

        Assert.Contains("tenant=from-di", await probe.HeadersAsync()); // the client interceptor from DI
        using (OffloadCallScope.Begin().WithHeader("deny", "by DI interceptor"))
        {
            RemoteInvocationException refused = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await probe.PingAsync());
            Assert.Equal("System.UnauthorizedAccessException", refused.RemoteExceptionType);
        }

        HealthReport health = await client.GetRequiredService<HealthCheckService>().CheckHealthAsync();
        Assert.Equal(HealthStatus.Healthy, health.Status);
        Assert.Contains(health.Entries.Values, e => e.Description == $"Connected to {endpoint} over shared memory (server process {server.Id}).");
    }

    [Fact]
    public async Task A_singleton_implementation_serves_every_call()
    {
        string endpoint = Endpoints.Unique("hosted-single");
        await using PeerProcess server = StartHosted(endpoint, "--singleton");
        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();
        Assert.Equal(await probe.InstanceAsync(), await probe.InstanceAsync());
    }

    [Fact]
    public async Task The_managed_client_reconnects_after_the_server_process_is_killed_and_restarted()
    {
        string endpoint = Endpoints.Unique("reconnect");
        PeerProcess server = StartHosted(endpoint);
        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();
        HealthCheckService health = client.GetRequiredService<HealthCheckService>();
        byte[] data = new byte[256 << 10];
        Checksum64.Fill(data, 21);
        ulong expected = Checksum64.Compute(data);
        Assert.Equal(expected, await probe.ChecksumAsync(data));

        Task<string> inFlight = probe.WaitForCancelAsync(60_000).AsTask();
        await Eventually.TrueAsync(async () => (await probe.LastOutcomeAsync()) == "waiting", "the call is being served");
        server.Kill();
        await server.DisposeAsync();
        await Assert.ThrowsAsync<PeerDisconnectedException>(() => inFlight); // the call in flight fails

        Exception down = await Assert.ThrowsAnyAsync<Exception>(async () => await probe.ChecksumAsync(data)); // nobody serves the endpoint
        Assert.IsNotType<Xunit.Sdk.XunitException>(down);
        Assert.Equal(HealthStatus.Unhealthy, (await health.CheckHealthAsync()).Status);

        await using PeerProcess restarted = StartHosted(endpoint);
        ulong? after = null;
        await Eventually.TrueAsync(async () =>
        {
            try
            {
                after = await probe.ChecksumAsync(data);
                return true;
            }
            catch (PeerDisconnectedException)
            {
                return false; // within the backoff after a failed attempt
            }
        }, "a later call reconnects");
        Assert.Equal(expected, after);
        Assert.Equal(HealthStatus.Healthy, (await health.CheckHealthAsync()).Status);
    }

    [Fact]
    public async Task The_managed_client_connects_on_first_use_not_when_its_proxy_is_resolved()
    {
        string endpoint = Endpoints.Unique("lazy");
        await using PeerProcess server = StartHosted(endpoint);
        using var telemetry = new TelemetryRecorder();
        await using OffloadRpcConnection other = await OffloadRpcConnection.ConnectAsync(endpoint);
        await other.GetService<ICallProbe>().PingAsync(); // a call makes the instruments
        double before = telemetry.Observe("offloadrpc.connections", "offloadrpc.role", "client");

        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();
        await Task.Delay(300); // time enough for a connection an eager client would have opened meanwhile
        Assert.Equal(before, telemetry.Observe("offloadrpc.connections", "offloadrpc.role", "client")); // resolving the proxy did not connect

        await probe.PingAsync();
        Assert.Equal(before + 1, telemetry.Observe("offloadrpc.connections", "offloadrpc.role", "client")); // the first call did
        await probe.PingAsync();
        Assert.Same(probe, client.GetRequiredService<ICallProbe>());
        Assert.Equal(before + 1, telemetry.Observe("offloadrpc.connections", "offloadrpc.role", "client")); // and later calls share it
    }

    [Fact]
    public async Task After_failed_attempts_the_managed_client_waits_a_doubling_backoff_and_calls_meanwhile_fail_at_once()
    {
        string endpoint = Endpoints.Unique("backoff");
        await using ServiceProvider client = Client(endpoint); // nobody serves the endpoint
        ICallProbe probe = client.GetRequiredService<ICallProbe>();

        int attempts = 0, refused = 0;
        var elapsed = Stopwatch.StartNew();
        for (int i = 0; i < 300; i++)
        {
            Exception failure = await Assert.ThrowsAnyAsync<Exception>(async () => await probe.PingAsync());
            Assert.IsNotType<Xunit.Sdk.XunitException>(failure);
            if (failure is PeerDisconnectedException && failure.Message.Contains("the last attempt failed", StringComparison.Ordinal))
            {
                refused++; // within the backoff: no attempt made
                Assert.NotNull(failure.InnerException); // the failure of the last attempt
            }
            else
            {
                attempts++;
            }
        }

        // Attempts k >= 2 come at least 80 ms x (2^(k-1) - 1) after the first (100 ms doubling, jitter down to 0.8x).
        double bound = 1 + Math.Log2((elapsed.Elapsed.TotalMilliseconds / 80) + 1);
        Assert.InRange(attempts, 1, (int)Math.Floor(bound));
        Assert.Equal(300 - attempts, refused);

        await using PeerProcess server = StartHosted(endpoint);
        await Eventually.TrueAsync(async () =>
        {
            try
            {
                await probe.PingAsync();
                return true;
            }
            catch (PeerDisconnectedException)
            {
                return false; // within the backoff after the last failed attempt
            }
        }, "a call after the backoff connects");
    }

    [Fact]
    public async Task On_host_stop_a_call_in_flight_finishes_within_the_shutdown_timeout_and_the_health_check_turns_unhealthy()
    {
        string endpoint = Endpoints.Unique("graceful");
        PeerProcess server = StartHosted(endpoint, "--shutdown-ms", "30000");
        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();
        await probe.PingAsync();

        Task<string> inFlight = probe.WaitForCancelAsync(3000).AsTask();
        await Eventually.TrueAsync(async () => (await probe.LastOutcomeAsync()) == "waiting", "the call is being served");
        server.CloseInput(); // the host stops
        server.WaitForLine("STOPPING");
        Assert.Equal("completed", await inFlight);
        Assert.Equal("HEALTH Unhealthy", server.WaitForLine("HEALTH"));
        Assert.Equal("OUTCOME completed", server.WaitForLine("OUTCOME"));
        Assert.Equal(0, await server.WaitForExitAsync(TimeSpan.FromSeconds(30)));
        await server.DisposeAsync();
    }

    [Fact]
    public async Task On_host_stop_a_call_still_running_at_the_shutdown_timeout_is_cancelled()
    {
        string endpoint = Endpoints.Unique("shutdown");
        PeerProcess server = StartHosted(endpoint, "--shutdown-ms", "300");
        await using ServiceProvider client = Client(endpoint);
        ICallProbe probe = client.GetRequiredService<ICallProbe>();

        Task<string> inFlight = probe.WaitForCancelAsync(60_000).AsTask();
        await Eventually.TrueAsync(async () => (await probe.LastOutcomeAsync()) == "waiting", "the call is being served");
        server.CloseInput();
        await Assert.ThrowsAsync<PeerDisconnectedException>(() => inFlight);
        Assert.Equal("OUTCOME cancelled deadline=no", server.WaitForLine("OUTCOME")); // the method's token fired
        await server.DisposeAsync();
    }

    [Fact]
    public async Task A_streamed_result_flows_through_the_managed_connection()
    {
        string endpoint = Endpoints.Unique("hosted-stream");
        await using PeerProcess server = PeerProcess.Start(["typed-server", endpoint]);
        server.WaitForLine("READY");
        var services = new ServiceCollection();
        services.AddOffloadRpcClient<IFrameSource>(endpoint);
        await using ServiceProvider client = services.BuildServiceProvider();
        IFrameSource frames = client.GetRequiredService<IFrameSource>();

        var ticks = new List<Tick>();
        await foreach (Tick tick in frames.TicksAsync(5, "managed"))
        {
            ticks.Add(tick);
        }

        Assert.Equal([0, 1, 2, 3, 4], ticks.Select(t => t.Index));
        Assert.All(ticks, t => Assert.Equal("managed", t.Label));
    }

    [Fact]
    public async Task OpenTelemetry_exports_one_trace_across_both_processes()
    {
        string endpoint = Endpoints.Unique("otel");
        await using PeerProcess server = PeerProcess.Start(["probe-server", endpoint, "--traces"]);
        server.WaitForLine("READY");
        var exported = new List<Activity>();
        using (TracerProvider tracing = Sdk.CreateTracerProviderBuilder().AddSource(OffloadRpcTelemetry.ActivitySourceName).AddInMemoryExporter(exported).Build())
        {
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(endpoint);
            string[] seen = (await connection.GetService<ICallProbe>().TraceAsync()).Split(' ');
            tracing.ForceFlush();
            Activity span = Assert.Single(exported, a => a.DisplayName.EndsWith("/TraceAsync", StringComparison.Ordinal));
            Assert.Equal(ActivityKind.Client, span.Kind);
            Assert.Equal(span.TraceId.ToString(), seen[0]);
            Assert.Equal(span.SpanId.ToString(), seen[1]);
        }
    }

    internal sealed class TenantInterceptor(TenantInterceptor.Tenant tenant) : ClientInterceptor
    {
        public override ValueTask<TResult> InterceptAsync<TResult>(ClientInterceptorContext context, ClientCallContinuation<TResult> continuation)
        {
            context.RequestHeaders.TryAdd("tenant", tenant.Name);
            return continuation(context);
        }

        internal sealed record Tenant(string Name);
    }
}
