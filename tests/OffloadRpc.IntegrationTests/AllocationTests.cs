using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>A small call allocates nothing, on the calling thread or anywhere else in the process.</summary>
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

        long threadBefore = GC.GetAllocatedBytesForCurrentThread();
        long processBefore = GC.GetTotalAllocatedBytes(precise: true);
        RunCalls(connection, body, 100_000);
        long threadDelta = GC.GetAllocatedBytesForCurrentThread() - threadBefore;
        long processDelta = GC.GetTotalAllocatedBytes(precise: true) - processBefore;

        // Any per-call allocation would be >= 24 bytes x 100k = 2.4 MB. Allow the test host's own background noise.
        Assert.True(threadDelta == 0, $"The calling thread allocated {threadDelta} bytes over 100k calls.");
        Assert.True(processDelta < 100_000, $"The process allocated {processDelta} bytes over 100k calls ({processDelta / 100_000.0:0.00} per call).");
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
