using System.Buffers.Binary;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Testing;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A soak with murder: eight client processes make every kind of call (small, 1 MiB copies, leases moved
/// without a copy, pipelined payloads) while a driver kills random ones with SIGKILL and starts new ones.
/// Bounded in time. At the end every survivor got every reply right, nothing hung, and the server's
/// descriptors, threads and mapped memory are back to their baseline.
/// </summary>
public sealed class ChaosTests
{
    private static readonly TimeSpan Soak = TimeSpan.FromSeconds(30);

    [Fact]
    public async Task Clients_killed_at_random_during_mixed_calls_leave_the_server_serving_and_whole()
    {
        await using RemoteServer server = RemoteServer.Start("chaos");
        await using RpcConnection observer = await server.ConnectAsync(new TransportOptions { RunContinuationsAsynchronously = true });
        int pid = server.Process.Id;
        (long mapped, long segments) = await MemoryAsync(observer);
        int descriptors = Descriptors(pid);
        int threads = Threads(pid);

        var random = new Random(20261205);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var running = new List<PeerProcess>();
        var finished = new List<PeerProcess>();
        int killed = 0;
        try
        {
            for (int i = 0; i < 8; i++)
            {
                running.Add(StartClient(server, Soak));
            }

            // Six murders (each replaced by a newcomer), at random moments of the soak.
            for (int murder = 0; murder < 6 && clock.Elapsed < Soak - TimeSpan.FromSeconds(4); murder++)
            {
                await Task.Delay(random.Next(200, 900));
                PeerProcess victim = running[random.Next(running.Count)];
                running.Remove(victim);
                victim.Kill(); // SIGKILL, in the middle of whatever call it was making
                finished.Add(victim);
                killed++;
                running.Add(StartClient(server, TimeSpan.FromSeconds(Math.Max(4, (Soak - clock.Elapsed).TotalSeconds))));
            }

            foreach (PeerProcess survivor in running)
            {
                string result = survivor.WaitForLine("OK", TimeSpan.FromMinutes(2));
                Assert.StartsWith("OK", result);
                Assert.Equal(0, await survivor.WaitForExitAsync(TimeSpan.FromMinutes(1)));
            }
        }
        finally
        {
            foreach (PeerProcess process in running.Concat(finished))
            {
                await process.DisposeAsync();
            }
        }

        Assert.True(killed >= 3, $"only {killed} clients were killed");
        await Eventually.TrueAsync(() => MemoryAsync(observer).AsTask().Result == (mapped, segments), "the server's shared memory is back to its baseline", TimeSpan.FromMinutes(1));
        await Eventually.TrueAsync(() => Descriptors(pid) <= descriptors, $"the server's descriptors are back to {descriptors} (now {Descriptors(pid)})", TimeSpan.FromMinutes(1));
        await Eventually.TrueAsync(() => Threads(pid) <= threads + 4, $"the server's threads are back near {threads} (now {Threads(pid)})", TimeSpan.FromMinutes(1));
        using RpcReply reply = await observer.CallAsync(PeerMethods.Echo, "after the storm"u8, default);
        Assert.True(reply.Body.SequenceEqual("after the storm"u8));
    }

    private static PeerProcess StartClient(RemoteServer server, TimeSpan duration)
    {
        PeerProcess client = PeerProcess.Start(["client-mixed", server.Endpoint, ((int)Math.Max(2, duration.TotalSeconds)).ToString()]);
        client.WaitForLine("READY", TimeSpan.FromMinutes(1));
        return client;
    }

    private static async ValueTask<(long Mapped, long Segments)> MemoryAsync(RpcConnection connection)
    {
        using RpcReply stats = await connection.CallAsync(PeerMethods.Stats, default, default);
        return (BinaryPrimitives.ReadInt64LittleEndian(stats.Body), BinaryPrimitives.ReadInt64LittleEndian(stats.Body[8..]));
    }

    /// <summary>The server's sockets and shared-memory descriptors.</summary>
    private static int Descriptors(int pid) => Directory.GetFiles($"/proc/{pid}/fd").Count(f =>
    {
        try
        {
            string target = new FileInfo(f).LinkTarget ?? string.Empty;
            return target.StartsWith("socket:", StringComparison.Ordinal) || target.StartsWith("/memfd:", StringComparison.Ordinal);
        }
        catch (IOException)
        {
            return false;
        }
    });

    private static int Threads(int pid) => Directory.GetDirectories($"/proc/{pid}/task").Length;
}
