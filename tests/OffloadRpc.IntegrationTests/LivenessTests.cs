using System.Buffers.Binary;
using OffloadRpc.Testing;
using OffloadRpc.TestContracts;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Peer death: kill -9 of either side never hangs the other, and a server reclaims a dead client's memory.</summary>
public sealed class LivenessTests
{
    [Fact]
    public async Task Killing_the_server_during_a_call_fails_it_and_every_later_call_with_PeerDisconnectedException()
    {
        await using RemoteServer server = RemoteServer.Start("kill-server");
        await using RpcConnection connection = await server.ConnectAsync();
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 600_000);
        ValueTask<RpcReply> pending = connection.CallAsync(PeerMethods.Hold, body, [OutboundPayload.Copy(new byte[8 << 20])]);
        await Task.Delay(200);

        server.Process.Kill();

        await Assert.ThrowsAsync<PeerDisconnectedException>(async () => await pending.AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        await Assert.ThrowsAsync<PeerDisconnectedException>(async () => await connection.CallAsync(PeerMethods.Echo, "late"u8, default));
        Assert.Throws<PeerDisconnectedException>(() => connection.Rent(10));
        await connection.Completion.WaitAsync(TimeSpan.FromSeconds(30));
    }

    [Fact]
    public async Task Killing_a_client_leaves_the_other_clients_served_and_the_server_memory_returns_to_baseline()
    {
        await using RemoteServer server = RemoteServer.Start("kill-client");
        await using RpcConnection survivor = await server.ConnectAsync();
        using (RpcReply warm = await survivor.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(new byte[1 << 20])]))
        {
        }

        (long baselineBytes, long baselineSegments) = await ServerMemoryAsync(survivor);

        // A second client sends 64 MiB that the server holds, then dies without a word.
        await using PeerProcess victim = PeerProcess.Start(["client-hold", server.Endpoint, (64 << 20).ToString()]);
        victim.WaitForLine("HOLDING");
        await Eventually.TrueAsync(async () => (await ServerMemoryAsync(survivor)).Bytes >= baselineBytes + (64 << 20), "the server maps the victim's payload");

        victim.Kill();

        await Eventually.TrueAsync(async () => await ServerMemoryAsync(survivor) == (baselineBytes, baselineSegments), "the server's shared memory is back to its baseline");
        byte[] payload = new byte[2 << 20];
        Checksum64.Fill(payload, 17);
        using RpcReply reply = await survivor.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Copy(payload)]);
        Assert.Equal(Checksum64.Compute(payload), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
    }

    private static async Task<(long Bytes, long Segments)> ServerMemoryAsync(RpcConnection connection)
    {
        using RpcReply stats = await connection.CallAsync(PeerMethods.Stats, default, default);
        return (BinaryPrimitives.ReadInt64LittleEndian(stats.Body), BinaryPrimitives.ReadInt64LittleEndian(stats.Body[8..]));
    }

    [Fact]
    public async Task Disposing_a_connection_fails_its_pending_calls_and_frees_its_memory()
    {
        await using RemoteServer server = RemoteServer.Start("dispose");
        long mappedBefore = SharedMemorySegment.MappedBytes;
        RpcConnection connection = await server.ConnectAsync();
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 600_000);
        ValueTask<RpcReply> pending = connection.CallAsync(PeerMethods.Sleep, body, default);
        using (RpcReply reply = await connection.CallAsync(PeerMethods.Echo, default, [OutboundPayload.Copy(new byte[1 << 20])]))
        {
        }

        await connection.DisposeAsync();
        await Assert.ThrowsAsync<ObjectDisposedException>(async () => await pending);
        Assert.Equal(mappedBefore, SharedMemorySegment.MappedBytes);
    }

    [Fact]
    public async Task Connecting_to_an_endpoint_nobody_serves_fails_at_once()
    {
        await Assert.ThrowsAsync<PeerDisconnectedException>(() => Handshake.ConnectAsync(Endpoints.Unique("nobody"), new TransportOptions(), [], null, CancellationToken.None));
    }

    /// <summary>
    /// Over gRPC a server can vanish without closing its connection (its host powered off, the network cut):
    /// TCP tells a side that only waits nothing, so a call would wait for ever. A frozen server process
    /// (SIGSTOP: the kernel still holds its socket open, nothing answers) is that case on one host. The
    /// connection's default handler pings a server that has said nothing for 20 s while calls run, and
    /// gives it up when 20 s more pass without an answer: the call fails with PeerDisconnectedException.
    /// </summary>
    [Fact]
    public async Task A_call_to_a_gRPC_server_that_stops_answering_fails_with_PeerDisconnectedException_instead_of_waiting_for_ever()
    {
        string endpoint = Endpoints.Unique("frozen");
        try
        {
            await using PeerProcess server = PeerProcess.Start(["grpc-server", endpoint]);
            string address = server.WaitForLine("READY", TimeSpan.FromSeconds(60)).Split(' ')[2];
            await using OffloadRpcConnection connection = await OffloadRpcConnection.ConnectAsync(address, new OffloadRpcOptions { PreferSharedMemory = false });
            IImageService images = connection.GetService<IImageService>();
            byte[] bytes = new byte[(1 << 20) + 7];
            Checksum64.Fill(bytes, 3);
            Assert.Equal(Checksum64.Compute(bytes), await images.ChecksumAsync(bytes));

            Assert.Equal(0, Signal(server.Id, Stop));
            try
            {
                await Assert.ThrowsAsync<PeerDisconnectedException>(() => images.ChecksumAsync(bytes).AsTask().WaitAsync(TimeSpan.FromSeconds(150)));
            }
            finally
            {
                Signal(server.Id, Continue); // ended by its dispose
            }
        }
        finally
        {
            Endpoints.RemoveStale(endpoint);
        }
    }

    private const int Stop = 19; // SIGSTOP on Linux (x64 and arm64)
    private const int Continue = 18; // SIGCONT

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int Signal(int processId, int signal);
}
