using Grpc.Core;
using Grpc.Net.Client.Balancer;
using Grpc.Net.Client.Configuration;
using Microsoft.Extensions.DependencyInjection;
using OffloadRpc.Grpc;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// gRPC's client-side load balancing under the same proxies: an address that gRPC resolves
/// (<c>dns:///host:port</c>, or a resolver of the channel's service provider) rather than one server's
/// http:// address, and the balancing policy of the channel's service config. Two server processes
/// (TestPeer grpc-server) on 127.0.0.1; each counts the calls its interceptor saw.
/// </summary>
public sealed class GrpcBalancingTests
{
    [Fact]
    public Task Calls_to_a_resolved_address_are_balanced_round_robin_over_the_servers_it_resolves_to() => WithTwoServersAsync("balanced", async (_, servers) =>
    {
        var options = new OffloadRpcOptions { PreferSharedMemory = false };
        Balanced(options, servers);
        await using (OffloadRpcConnection balanced = await OffloadRpcConnection.ConnectAsync("static:///images", options))
        {
            Assert.False(balanced.UsesSharedMemory);
            ICallProbe probe = balanced.GetService<ICallProbe>();
            byte[] data = new byte[100_000];
            int call = 0;
            async Task CallAsync(int count)
            {
                for (int i = 0; i < count; i++, call++)
                {
                    Checksum64.Fill(data, (ulong)call);
                    Assert.Equal(Checksum64.Compute(data), await probe.ChecksumAsync(data)); // every call's bytes, whichever server took it
                }
            }

            // Until both subchannels are ready (round robin uses only the ready ones), then a batch counted exactly.
            await Eventually.TrueAsync(async () => { await CallAsync(4); return (await Task.WhenAll(servers.Select(CountChecksumCallsAsync))).All(n => n > 0); }, "both servers take calls");
            int[] before = await Task.WhenAll(servers.Select(CountChecksumCallsAsync));
            await CallAsync(20);
            int[] after = await Task.WhenAll(servers.Select(CountChecksumCallsAsync));
            int[] took = [.. after.Zip(before, (x, y) => x - y)];
            Assert.Equal(20, took.Sum()); // each call served once
            Assert.All(took, n => Assert.InRange(n, 5, 15)); // by both, about alternately (exactly, while neither server's channel is reconnecting)
        }
    });

    [Fact]
    public Task When_one_balanced_server_dies_its_calls_fail_and_the_calls_on_the_other_run_on() => WithTwoServersAsync("dying", async (a, servers) =>
    {
        // A hosted client, which replaces a connection it finds closed: it must not find this one closed while a server is left.
        var services = new ServiceCollection();
        services.AddOffloadRpcClient<ICallProbe>("static:///pair", o =>
        {
            o.PreferSharedMemory = false;
            Balanced(o, servers);
        });
        await using ServiceProvider provider = services.BuildServiceProvider();
        ICallProbe probe = provider.GetRequiredService<ICallProbe>();
        await Eventually.TrueAsync(async () => { await probe.PingAsync(); return (await Task.WhenAll(servers.Select(PingsAsync))).All(n => n > 0); }, "both servers take calls");

        // Four long streams, two on each server (round robin over two ready servers), each past its first item.
        var streams = new List<IAsyncEnumerator<string>>();
        try
        {
            for (int i = 0; i < 4; i++)
            {
                IAsyncEnumerator<string> stream = probe.WatchAsync(10_000, 20).GetAsyncEnumerator();
                Assert.True(await stream.MoveNextAsync());
                streams.Add(stream);
            }

            a.Kill();
            bool[] alive = await Task.WhenAll(streams.Select(stream => RunsOnAsync(stream, TimeSpan.FromSeconds(1.5))));
            Assert.InRange(alive.Count(x => !x), 1, 3); // the dead server's (two, as round robin placed them): failed once what it had sent was read
            Assert.Contains(true, alive);

            // Later calls: the live server serves them, but the balancer learns of the death on its own
            // schedule, and a call it still sends to the dead server fails (each such failure once made a
            // hosted client replace the connection, and with it the live server's streams).
            int served = 0;
            for (int i = 0; i < 20; i++)
            {
                try
                {
                    await probe.PingAsync();
                    served++;
                }
                catch (PeerDisconnectedException)
                {
                    // sent to the dead server: how soon the balancer stops doing that is gRPC's (seconds, on a loaded machine)
                }
            }

            Assert.True(served > 0, "no call reached the live server");

            // And the live server's streams were not cut by a reconnect: they run on.
            foreach (IAsyncEnumerator<string> stream in streams.Where((_, i) => alive[i]))
            {
                Assert.True(await RunsOnAsync(stream, TimeSpan.FromSeconds(0.5)));
            }
        }
        finally
        {
            foreach (IAsyncEnumerator<string> stream in streams)
            {
                try
                {
                    await stream.DisposeAsync();
                }
                catch (PeerDisconnectedException)
                {
                }
            }
        }
    });

    [Fact]
    public async Task A_dns_address_of_a_server_on_this_host_switches_to_shared_memory_unless_told_not_to()
    {
        string endpoint = Endpoints.Unique("dns");
        try
        {
            await using PeerProcess process = PeerProcess.Start(["grpc-server", endpoint]);
            var server = new Uri(process.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2]);
            string address = $"dns:///127.0.0.1:{server.Port}";
            byte[] data = new byte[(2 << 20) + 9];
            Checksum64.Fill(data, 77);
            foreach (bool prefer in new[] { false, true })
            {
                var options = new OffloadRpcOptions { PreferSharedMemory = prefer }.ConfigureGrpcChannel(channel => channel.Credentials = ChannelCredentials.Insecure);
                await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, options);
                Assert.Equal(prefer, connection.UsesSharedMemory);
                Assert.Equal(Checksum64.Compute(data), await connection.GetService<IImageService>().ChecksumAsync(data));
            }
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    /// <summary>Two grpc-server test peers on 127.0.0.1, given to <paramref name="body"/> (the first, and both gRPC addresses); their sockets removed after.</summary>
    private static async Task WithTwoServersAsync(string name, Func<PeerProcess, Uri[], Task> body)
    {
        string first = Endpoints.Unique(name + "-a"), second = Endpoints.Unique(name + "-b");
        try
        {
            await using PeerProcess a = PeerProcess.Start(["grpc-server", first]);
            await using PeerProcess b = PeerProcess.Start(["grpc-server", second]);
            await body(a, [new(a.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2]), new(b.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2])]);
        }
        finally
        {
            Endpoints.RemoveStale(first);
            Endpoints.RemoveStale(second);
        }
    }

    /// <summary>Reads <paramref name="stream"/> for <paramref name="period"/>: true when it still yields items then, false when it failed as disconnected.</summary>
    private static async Task<bool> RunsOnAsync(IAsyncEnumerator<string> stream, TimeSpan period)
    {
        DateTime until = DateTime.UtcNow + period;
        try
        {
            while (DateTime.UtcNow < until)
            {
                Assert.True(await stream.MoveNextAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
            }

            return true;
        }
        catch (PeerDisconnectedException)
        {
            return false;
        }
    }

    /// <summary>Channel options of a static resolver that resolves to <paramref name="servers"/>, balanced round robin, without TLS.</summary>
    private static void Balanced(OffloadRpcOptions options, Uri[] servers)
    {
        var resolved = new ServiceCollection();
        resolved.AddSingleton<ResolverFactory>(new StaticResolverFactory(_ => servers.Select(s => new BalancerAddress(s.Host, s.Port))));
        ServiceProvider provider = resolved.BuildServiceProvider();
        options.ConfigureGrpcChannel(channel =>
        {
            channel.Credentials = ChannelCredentials.Insecure; // a resolved address does not say whether it is TLS
            channel.ServiceProvider = provider;
            channel.ServiceConfig = new ServiceConfig { LoadBalancingConfigs = { new RoundRobinConfig() } };
        });
    }

    /// <summary>How many PingAsync calls the server at <paramref name="server"/> served.</summary>
    private static Task<int> PingsAsync(Uri server) => CountAsync(server, "intercepted PingAsync ");

    /// <summary>How many ChecksumAsync calls the server at <paramref name="server"/> served, as its interceptor logged them (asked over a connection of its own).</summary>
    private static Task<int> CountChecksumCallsAsync(Uri server) => CountAsync(server, "intercepted ChecksumAsync ");

    private static async Task<int> CountAsync(Uri server, string prefix)
    {
        await using OffloadRpcConnection direct = await OffloadRpcConnection.ConnectAsync(server.ToString().TrimEnd('/'), new OffloadRpcOptions { PreferSharedMemory = false });
        string[] log = await direct.GetService<ICallProbe>().ServerLogAsync();
        return log.Count(line => line.StartsWith(prefix, StringComparison.Ordinal));
    }
}
