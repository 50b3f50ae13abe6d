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
