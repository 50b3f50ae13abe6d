using System.Buffers;
using System.Collections.Concurrent;
using OffloadRpc.Tests.Infrastructure;
using OffloadRpc.Transport;
using Xunit;

namespace OffloadRpc.Tests;

/// <summary>
/// The outbound message against a real connection in this process: a commit frees nothing (the
/// blocks are the peer's until it releases them), an abandon gives back every block, lease and pin.
/// Checked on the arena's own counters, for the synchronous, the asynchronous offload and the pipelined path.
/// </summary>
public sealed class OutboundMessageTests : IAsyncLifetime
{
    private const int Large = 256 << 10;
    private static readonly long PipelinedLength = 2 * Engines.TransferPolicy.PipelineChunkBytes;

    private readonly HoldingServer _server = new();
    private RpcConnection _connection = null!;
    private RpcConnection _other = null!;

    public async Task InitializeAsync()
    {
        _connection = await _server.ConnectAsync();
        _other = await _server.ConnectAsync();
    }

    public async Task DisposeAsync()
    {
        _server.ReleaseAll();
        await _connection.DisposeAsync();
        await _other.DisposeAsync();
        await _server.DisposeAsync();
    }

    private PayloadArena Arena => _connection.Arena;

    [Fact]
    public void Abandon_on_the_synchronous_path_frees_every_block_and_reattaches_the_leases_it_detached()
    {
        using SharedBuffer moved = _connection.Rent(4096);
        using SharedBuffer foreign = _other.Rent(4096); // another connection's lease: copied, not moved
        long before = Arena.UsedBytes;
        Assert.Equal(4096, before);

        OutboundMessage message = OutboundMessage.Begin(_connection, MessageKind.Request, 0, 1);
        message.AddBody(new byte[_connection.Geometry.SlotSize], inArena: true, keepInlineCopy: false, CancellationToken.None);
        message.Add(OutboundPayload.Copy(new byte[Large], TransferMode.Copy), allowAsync: false, CancellationToken.None);
        message.Add(OutboundPayload.Move(moved), allowAsync: false, CancellationToken.None);
        message.Add(OutboundPayload.Move(foreign), allowAsync: false, CancellationToken.None);
        Assert.Equal(3, message.AllocatedCount); // body, copy, and the foreign lease's copy
        Assert.Equal(before + PayloadArena.RoundUp(_connection.Geometry.SlotSize) + Large + 4096, Arena.UsedBytes);
        Assert.False(moved.IsValid); // detached: it would move with the message

        message.Abandon(disposeLeases: false);

        Assert.Equal(before, Arena.UsedBytes);
        Assert.True(moved.IsValid);
        Assert.True(foreign.IsValid); // still the caller's
        Assert.Equal(0, message.AllocatedCount);
    }

    [Fact]
    public void Abandon_with_nobody_left_to_own_the_leases_disposes_them_too()
    {
        SharedBuffer moved = _connection.Rent(4096);
        SharedBuffer foreign = _other.Rent(4096);
        long otherBefore = _other.Arena.UsedBytes;

        OutboundMessage message = OutboundMessage.Begin(_connection, MessageKind.Request, 0, 1);
        message.Add(OutboundPayload.Move(moved), allowAsync: false, CancellationToken.None);
        message.Add(OutboundPayload.Move(foreign), allowAsync: false, CancellationToken.None);
        message.Abandon(disposeLeases: true);

        Assert.False(moved.IsValid);
        Assert.False(foreign.IsValid);
        Assert.Equal(0, Arena.UsedBytes);
        Assert.Equal(otherBefore - 4096, _other.Arena.UsedBytes);
    }

    [Fact]
    public void Abandon_on_the_offload_path_unpins_and_frees_before_any_copy_runs()
    {
        var buffer = new CountingMemory(new byte[Large]);
        OutboundMessage message = OutboundMessage.Begin(_connection, MessageKind.Request, 0, 1);
        message.AddBody("body"u8, inArena: false, keepInlineCopy: true, CancellationToken.None);
        message.Add(OutboundPayload.Copy(buffer.Memory, TransferMode.Offload), allowAsync: true, CancellationToken.None);
        Assert.Equal(1, message.AsyncCopyCount);
        Assert.Equal(1, message.PinCount);
        Assert.Equal(1, buffer.Pins);
        Assert.Equal(Large, Arena.UsedBytes);

        message.Abandon(disposeLeases: false);

        Assert.Equal(0, buffer.Pins);
        Assert.Equal(0, Arena.UsedBytes);
    }

    [Fact]
    public void Abandon_on_the_pipelined_path_frees_the_block_with_its_progress_header()
    {
        OutboundMessage message = OutboundMessage.Begin(_connection, MessageKind.Request, 0, 1);
        message.Add(OutboundPayload.Copy(new byte[PipelinedLength], TransferMode.Pipelined), allowAsync: false, CancellationToken.None);
        Assert.Equal(1, message.DeferredCount);
        Assert.Equal(PayloadArena.RoundUp(PipelineHeader.Size + PipelinedLength), Arena.UsedBytes);

        message.Abandon(disposeLeases: false);

        Assert.Equal(0, Arena.UsedBytes);
    }

    [Fact]
    public async Task Commit_on_the_synchronous_path_frees_nothing_until_the_peer_releases()
    {
        using SharedBuffer moved = _connection.Rent(4096);
        moved.Span.Fill(7);
        ValueTask<RpcReply> call = _connection.CallAsync(1, "sync"u8, [OutboundPayload.Copy(new byte[Large], TransferMode.Copy), OutboundPayload.Move(moved)]);
        await _server.Holding(2);

        Assert.Equal(Large + 4096, Arena.UsedBytes); // both blocks are lent to the peer, none freed
        Assert.False(moved.IsValid);
        Assert.Equal(7, _server.Held.Last().Span[0]);

        await ReleaseAndFinish(call, "sync");
    }

    [Fact]
    public async Task Commit_on_the_offload_path_publishes_from_the_pool_and_unpins()
    {
        var buffer = new CountingMemory(new byte[Large]);
        buffer.Array.AsSpan().Fill(9);
        ValueTask<RpcReply> call = _connection.CallAsync(1, "offload"u8, [OutboundPayload.Copy(buffer.Memory, TransferMode.Offload)]);
        await _server.Holding(1);

        Assert.Equal(0, buffer.Pins); // the copy is done before the request is published
        Assert.Equal(Large, Arena.UsedBytes);
        Assert.True(_server.Held.Last().Span.IndexOfAnyExcept((byte)9) < 0);

        await ReleaseAndFinish(call, "offload");
    }

    [Fact]
    public async Task Commit_on_the_pipelined_path_keeps_the_block_lent_until_written_and_released()
    {
        byte[] data = new byte[PipelinedLength];
        data.AsSpan().Fill(5);
        ValueTask<RpcReply> call = _connection.CallAsync(1, "pipelined"u8, [OutboundPayload.Copy(data, TransferMode.Pipelined)]);
        await _server.Holding(1);

        Assert.Equal(PayloadArena.RoundUp(PipelineHeader.Size + PipelinedLength), Arena.UsedBytes);
        Assert.True(_server.Held.Last().Span.IndexOfAnyExcept((byte)5) < 0);

        await ReleaseAndFinish(call, "pipelined");
    }

    private async Task ReleaseAndFinish(ValueTask<RpcReply> call, string body)
    {
        _server.ReleaseAll();
        using (RpcReply reply = await call.AsTask().WaitAsync(TimeSpan.FromMinutes(1)))
        {
            Assert.Equal(body, System.Text.Encoding.UTF8.GetString(reply.Body));
        }

        // The releases come back through the release ring; the next allocation drains it.
        await Eventually.TrueAsync(
            () =>
            {
                _connection.Rent(64).Dispose();
                return Arena.UsedBytes == 0;
            },
            "the peer's releases to give every block back");
    }

    /// <summary>Array-backed memory that counts its pins (the offload path pins the caller's buffer for the copy workers).</summary>
    private sealed class CountingMemory : MemoryManager<byte>
    {
        private int _pins;

        public CountingMemory(byte[] array) => Array = array;

        public byte[] Array { get; }

        public int Pins => Volatile.Read(ref _pins);

        public override Span<byte> GetSpan() => Array;

        public override unsafe MemoryHandle Pin(int elementIndex = 0)
        {
            Interlocked.Increment(ref _pins);
            var handle = System.Runtime.InteropServices.GCHandle.Alloc(Array, System.Runtime.InteropServices.GCHandleType.Pinned);
            return new MemoryHandle((byte*)handle.AddrOfPinnedObject() + elementIndex, handle, this);
        }

        public override void Unpin() => Interlocked.Decrement(ref _pins);

        protected override bool TryGetArray(out ArraySegment<byte> segment)
        {
            segment = new ArraySegment<byte>(Array);
            return true;
        }

        protected override void Dispose(bool disposing)
        {
        }
    }

    /// <summary>A server in this process that keeps every payload it receives until told to let go, then echoes the body.</summary>
    private sealed class HoldingServer : IRequestHandler, IAsyncDisposable
    {
        private readonly string _endpoint = Endpoints.Unique("outbound");
        private readonly RpcListener _listener;
        private readonly ConcurrentQueue<SharedBuffer> _held = new();
        private TaskCompletionSource _release = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public HoldingServer()
        {
            _listener = new RpcListener(_endpoint, new TransportOptions { DispatchToThreadPool = true }, [], _ => this);
            _listener.Start();
        }

        public IEnumerable<SharedBuffer> Held => _held;

        public Task<RpcConnection> ConnectAsync() => Handshake.ConnectAsync(_endpoint, new TransportOptions(), [], null, CancellationToken.None);

        public Task Holding(int count) => Eventually.TrueAsync(() => _held.Count >= count, $"the server to hold {count} payload(s)");

        public void ReleaseAll()
        {
            TaskCompletionSource release = _release;
            _release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            release.TrySetResult();
        }

        public async ValueTask HandleAsync(IncomingCall call)
        {
            Task release = _release.Task;
            for (int i = 0; i < call.PayloadCount; i++)
            {
                _held.Enqueue(call.TakePayload(i));
            }

            await release.ConfigureAwait(false);
            while (_held.TryDequeue(out SharedBuffer? lease))
            {
                lease.Dispose();
            }

            call.Reply(call.Body);
        }

        public ValueTask DisposeAsync() => _listener.DisposeAsync();
    }
}
