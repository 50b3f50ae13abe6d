using System.Buffers.Binary;
using OffloadRpc.Testing;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>Payloads of every size cross to a server process and back; content is verified by checksum on both sides.</summary>
public sealed class RoundTripTests : IAsyncLifetime
{
    private RemoteServer _server = null!;
    private RpcConnection _connection = null!;

    public async Task InitializeAsync()
    {
        _server = RemoteServer.Start("roundtrip");
        _connection = await _server.ConnectAsync();
    }

    public async Task DisposeAsync()
    {
        await _connection.DisposeAsync();
        await _server.DisposeAsync();
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(4096)]
    [InlineData(1 << 20)]
    [InlineData(64 << 20)]
    [InlineData(256 << 20)]
    public async Task Payload_round_trips_with_identical_content(int size)
    {
        byte[] payload = GC.AllocateUninitializedArray<byte>(size);
        Checksum64.Fill(payload, (ulong)size + 11);
        ulong expected = Checksum64.Compute(payload);

        // The server checksums what it received in shared memory.
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, "body"u8, [OutboundPayload.Copy(payload)]))
        {
            Assert.Equal(Checksum64.Compute("body"u8), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body));
            Assert.Equal(size, BinaryPrimitives.ReadInt64LittleEndian(reply.Body[8..]));
            Assert.Equal(expected, BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
        }

        // The server copies it into its own arena and sends it back.
        using (RpcReply echo = await _connection.CallAsync(PeerMethods.Echo, "x"u8, [OutboundPayload.Copy(payload)]))
        {
            Assert.Equal(1, echo.PayloadCount);
            using SharedBuffer back = echo.TakePayload(0);
            Assert.Equal(size, back.Length);
            Assert.Equal(expected, Checksum64.Compute(back.Span));
        }
    }

    [Fact]
    public async Task Several_payloads_and_a_body_larger_than_a_slot_travel_in_one_message()
    {
        byte[] body = new byte[10_000];
        Checksum64.Fill(body, 3);
        var payloads = new OutboundPayload[5];
        var sums = new ulong[5];
        for (int i = 0; i < payloads.Length; i++)
        {
            byte[] data = new byte[1000 * (i + 1) + i];
            Checksum64.Fill(data, (ulong)i);
            sums[i] = Checksum64.Compute(data);
            payloads[i] = OutboundPayload.Copy(data);
        }

        using RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, body, payloads);
        Assert.Equal(Checksum64.Compute(body), BinaryPrimitives.ReadUInt64LittleEndian(reply.Body));
        for (int i = 0; i < payloads.Length; i++)
        {
            Assert.Equal(payloads[i].Length, BinaryPrimitives.ReadInt64LittleEndian(reply.Body[(8 + 16 * i)..]));
            Assert.Equal(sums[i], BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[(16 + 16 * i)..]));
        }

        using RpcReply echo = await _connection.CallAsync(PeerMethods.Echo, body, default);
        Assert.True(echo.Body.SequenceEqual(body));
    }

    [Fact]
    public async Task Server_exception_arrives_as_RemoteInvocationException_with_type_message_and_stack()
    {
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await _connection.CallAsync(PeerMethods.Throw, "kaput"u8, default));
        Assert.Equal(typeof(InvalidOperationException).FullName, ex.RemoteExceptionType);
        Assert.Equal("boom: kaput", ex.RemoteMessage);
        Assert.Contains("PeerHandler", ex.RemoteStackTrace);

        // The connection is still fine.
        using RpcReply reply = await _connection.CallAsync(PeerMethods.Echo, "after"u8, default);
        Assert.True(reply.Body.SequenceEqual("after"u8));
    }

    [Fact]
    public async Task A_reply_that_cannot_be_sent_reaches_the_caller_as_a_fault_instead_of_a_hang()
    {
        var ex = await Assert.ThrowsAsync<RemoteInvocationException>(async () => await _connection.CallAsync(PeerMethods.BadReply, default, default).AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Equal(typeof(ArgumentException).FullName, ex.RemoteExceptionType);
    }

    [Fact]
    public async Task Cancelling_a_call_cancels_the_server_side_and_the_caller_gets_OperationCanceledException()
    {
        int before = await CancellationsSeenAsync();
        using var cts = new CancellationTokenSource();
        byte[] body = new byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(body, 60_000);
        ValueTask<RpcReply> call = _connection.CallAsync(PeerMethods.Sleep, body, default, cts.Token);
        await Task.Delay(100);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await call);

        // The server's token fired: its handler counted the cancellation.
        int after = before;
        for (int i = 0; i < 200 && after == before; i++)
        {
            await Task.Delay(25);
            after = await CancellationsSeenAsync();
        }

        Assert.Equal(before + 1, after);
    }

    private async Task<int> CancellationsSeenAsync()
    {
        using RpcReply stats = await _connection.CallAsync(PeerMethods.Stats, default, default);
        return BinaryPrimitives.ReadInt32LittleEndian(stats.Body[20..]);
    }

    [Fact]
    public async Task Leases_move_both_ways_without_copies()
    {
        // Client -> server: written in place, passed on, gone from the client.
        SharedBuffer lease = _connection.Rent(3 << 20);
        Assert.Equal(3 << 20, lease.Length);
        Assert.Equal(lease.Length, lease.Memory.Length);
        Checksum64.Fill(lease.Span, 5);
        ulong sum = Checksum64.Compute(lease.Span);
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Move(lease)]))
        {
            Assert.Equal(sum, BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
        }

        Assert.False(lease.IsValid);
        Assert.Throws<ObjectDisposedException>(() => lease.Span.Length);

        // Server -> client: the server rents, fills and returns a lease.
        byte[] body = new byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(body, 5 << 20);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(4), 99);
        byte[] expected = new byte[5 << 20];
        Checksum64.Fill(expected, 99);
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.RentAndReturn, body, default))
        {
            using SharedBuffer fromServer = reply.TakePayload(0);
            Assert.Equal(Checksum64.Compute(expected), Checksum64.Compute(fromServer.Span));
        }

        // Client -> server -> client: the same block comes home.
        SharedBuffer roundTrip = _connection.Rent(1000);
        Checksum64.Fill(roundTrip.Span, 1);
        ulong roundTripSum = Checksum64.Compute(roundTrip.Span);
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.ReturnLease, default, [OutboundPayload.Move(roundTrip)]))
        {
            using SharedBuffer home = reply.TakePayload(0);
            Assert.Equal(1000, home.Length);
            Assert.Equal(roundTripSum, Checksum64.Compute(home.Span));
        }

        // Every block is back once the server's releases are drained.
        await Eventually.TrueAsync(() => _connection.Arena.UsedBytes == 0, "the client's arena is empty again");
    }

    [Fact]
    public async Task A_lease_received_from_the_server_can_be_sent_back_to_it_without_a_copy()
    {
        byte[] body = new byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(body, 2 << 20);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(4), 123);
        SharedBuffer fromServer;
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.RentAndReturn, body, default))
        {
            fromServer = reply.TakePayload(0);
        }

        // The reply is gone, the lease is not: it outlives its call.
        ulong sum = Checksum64.Compute(fromServer.Span);
        fromServer.Span[0] ^= 0xFF; // and it is writable in place
        sum = Checksum64.Compute(fromServer.Span);

        // Onward to the server it came from: the server gets its own block back.
        using (RpcReply reply = await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Move(fromServer)]))
        {
            Assert.Equal(sum, BinaryPrimitives.ReadUInt64LittleEndian(reply.Body[16..]));
        }

        Assert.False(fromServer.IsValid);
    }

    [Fact]
    public async Task A_received_lease_keeps_its_bytes_after_its_connection_is_disposed()
    {
        byte[] body = new byte[12];
        BinaryPrimitives.WriteInt32LittleEndian(body, 1 << 20);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(4), 77);
        byte[] expected = new byte[1 << 20];
        Checksum64.Fill(expected, 77);

        SharedBuffer lease;
        await using (RpcConnection connection = await _server.ConnectAsync())
        {
            using RpcReply reply = await connection.CallAsync(PeerMethods.RentAndReturn, body, default);
            lease = reply.TakePayload(0);
        }

        // The connection and its arena are gone; the mapping the lease holds is not.
        Assert.True(lease.Span.SequenceEqual(expected));
        lease.Dispose(); // giving it back to a closed connection is quiet
        Assert.False(lease.IsValid);
    }

    [Fact]
    public async Task A_disposed_lease_cannot_be_sent_and_the_failed_send_loses_nothing()
    {
        SharedBuffer lease = _connection.Rent(64);
        lease.Dispose();
        await Assert.ThrowsAsync<ObjectDisposedException>(async () => await _connection.CallAsync(PeerMethods.Checksum, default, [OutboundPayload.Move(lease)]));

        long used = _connection.Arena.UsedBytes;
        await Assert.ThrowsAsync<ArgumentException>(async () => await _connection.CallAsync(PeerMethods.Checksum, default, new OutboundPayload[17]));
        Assert.Equal(used, _connection.Arena.UsedBytes);

        // A lease handed to a call that fails is the call's: it is given back, not left to the caller.
        SharedBuffer handed = _connection.Rent(4096);
        var payloads = new OutboundPayload[17];
        payloads[0] = OutboundPayload.Move(handed);
        await Assert.ThrowsAsync<ArgumentException>(async () => await _connection.CallAsync(PeerMethods.Checksum, default, payloads));
        Assert.False(handed.IsValid);
        Assert.Equal(used, _connection.Arena.UsedBytes);
    }
}
