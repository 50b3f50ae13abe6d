using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// A small call allocates nothing, on the calling thread or anywhere else in the process. Alone, so that
/// the process-wide count does not take in what tests running beside it allocate.
/// </summary>
[Collection(nameof(AllocationTests))]
public sealed class AllocationTests
{
    [Fact]
    public async Task One_hundred_thousand_small_calls_allocate_nothing()
    {
        await using RemoteServer server = RemoteServer.Start("alloc");
        await using RpcConnection connection = await server.ConnectAsync();
        byte[] body = new byte[64];

        // Warm up: pools, JIT tiers, the thread pool.
        RunCalls(connection, body, 20_000);

        // Any per-call allocation would be >= 24 bytes x 100k = 2.4 MB in every window. Something else in the
        // process may allocate once in a while (a one-off of about 600 KB shows in a fresh test host now and
        // then, with or without this library's latest changes), so the process's count is taken over up to
        // three windows and one of them must be clean; the calling thread must allocate nothing in any.
        var windows = new List<long>();
        for (int window = 0; window < 3; window++)
        {
            long threadBefore = GC.GetAllocatedBytesForCurrentThread();
            long processBefore = GC.GetTotalAllocatedBytes(precise: true);
            RunCalls(connection, body, 100_000);
            long threadDelta = GC.GetAllocatedBytesForCurrentThread() - threadBefore;
            windows.Add(GC.GetTotalAllocatedBytes(precise: true) - processBefore);
            Assert.True(threadDelta == 0, $"The calling thread allocated {threadDelta} bytes over 100k calls.");
            if (windows[^1] < 100_000)
            {
                return;
            }
        }

        Assert.Fail($"The process allocated in every window of 100k calls: {string.Join(", ", windows.Select(bytes => $"{bytes:N0} B ({bytes / 100_000.0:0.00} per call)"))}.");
    }

    /// <summary>Calls one at a time from this thread, waiting by polling the ValueTask (no Task, no continuation object).</summary>
    private static void RunCalls(RpcConnection connection, byte[] body, int count)
    {
        for (int i = 0; i < count; i++)
        {
            body[0] = (byte)i;
            ValueTask<RpcReply> call = connection.CallAsync(Testing.PeerMethods.Echo, body, default);
            int spins = 0;
            while (!call.IsCompleted)
            {
                if (++spins % 64 == 0)
                {
                    Thread.Yield();
                }
            }

            using RpcReply reply = call.Result;
            if (reply.Body[0] != (byte)i)
            {
                throw new Xunit.Sdk.XunitException("mismatched reply");
            }
        }
    }
}

/// <summary>Runs <see cref="AllocationTests"/> after the parallel tests, with nothing beside it.</summary>
[CollectionDefinition(nameof(AllocationTests), DisableParallelization = true)]
public sealed class AllocationTestsCollection
{
}
