using System.Buffers;
using System.Diagnostics;
using OffloadRpc.Engines;

namespace OffloadRpc.Transport;

/// <summary>
/// A <see cref="Stream"/> argument sent as it is read: its block is a ring of a few pipeline chunks,
/// published empty; each read lands straight in the ring and is announced at once, so the caller's reads,
/// the copy and the server's method overlap, with no intermediate buffer. The ring is reused as the server
/// takes what it read, so a stream of any length moves through a few MiB that stay in the processors'
/// shared cache: the writer's stores and the reader's loads meet there instead of in DRAM (for a large
/// stream this is faster than one copy into fresh memory). A seekable stream announces its length; one
/// that cannot seek marks its end when it ends. <see cref="Completion"/> tells the caller when the last
/// byte is in (or why it never will be).
/// </summary>
internal sealed class StreamSource
{
    private readonly Stream _stream;
    private readonly CancellationToken _cancellationToken;
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <param name="length">The bytes to send: the rest of a seekable stream, known before the message is built (announced to the receiver); -1 when the stream cannot tell (its end is marked when it ends).</param>
    public StreamSource(Stream stream, long length, CancellationToken cancellationToken)
    {
        _stream = stream;
        Length = length;
        _cancellationToken = cancellationToken;
    }

    /// <summary>The bytes to send, or -1: unknown until the stream ends (<see cref="IsLengthKnown"/>).</summary>
    public long Length { get; }

    /// <summary>The length is known up front and announced to the receiver; otherwise the end is marked when the stream ends.</summary>
    public bool IsLengthKnown => Length >= 0;

    /// <summary>The ring of a stream on <paramref name="connection"/>: a few pipeline chunks, at most a quarter of the arena, no more than the stream's announced length.</summary>
    public long RingBytes(RpcConnection connection)
    {
        long ring = Math.Max(4096, Math.Min(4 * connection.PipelineChunkBytes, connection.Arena.MaxBytes / 4) & ~(long)(PayloadArena.BlockAlignment - 1));
        return Length > 0 ? Math.Min(ring, Length) : ring;
    }

    /// <summary>Completes when every byte is in the block; fails with the stream's exception (or when it ends early); never started: stays pending.</summary>
    public Task Completion => _completion.Task;

    /// <summary>The message is out: read the stream into the ring (on the thread pool; the caller awaits the reply meanwhile).</summary>
    /// <param name="capacity">The ring's bytes after the header.</param>
    internal void Start(RpcConnection connection, ArenaBlock block, nint header, nint destination, long capacity) =>
        _ = PumpAsync(connection, block, header, destination, capacity);

    /// <summary>The message was never sent: nothing will be read.</summary>
    internal void Abandon(Exception reason) => _completion.TrySetException(reason);

    /// <summary>
    /// Reads the stream through a ring of <paramref name="capacity"/> bytes: each read lands at the write
    /// position modulo the ring, never more than the ring past what the receiver has taken (the writer waits
    /// for a chunk of room, spinning briefly, then on the receiver's word through the poller). At the end
    /// (the announced length, or the stream's end) the final length is published as the end mark. A
    /// receiver that stops reading (its method returned) ends the pump early and without error; one that
    /// reports taking bytes it was never given, or taking back, breaks the protocol. A seekable stream that
    /// ends before its announced length fails with <see cref="EndOfStreamException"/>.
    /// </summary>
    private async Task PumpAsync(RpcConnection connection, ArenaBlock block, nint header, nint destination, long capacity)
    {
        await Task.Yield(); // off the sending thread (it may be the caller's, which goes on to await the reply)
        long chunk = Math.Min(connection.PipelineChunkBytes, capacity);
        var room = new RingRoom(connection, header, capacity, chunk, _cancellationToken);
        try
        {
            while (true)
            {
                if (room.Written == Length)
                {
                    OutboundMessage.PublishEnd(header, Length);
                    break;
                }

                long free = await room.WaitAsync().ConfigureAwait(false);
                if (free < 0)
                {
                    break; // the receiver reads no more
                }

                long offset = room.Written % capacity;
                long want = Math.Min(Math.Min(chunk, free), capacity - offset);
                if (Length >= 0)
                {
                    want = Math.Min(want, Length - room.Written);
                }

                int read = await _stream.ReadAsync(Window(destination + (nint)offset, (int)want), _cancellationToken).ConfigureAwait(false);
                if (read == 0)
                {
                    if (Length >= 0)
                    {
                        throw new EndOfStreamException($"The Stream argument ended after {room.Written} of the {Length} bytes it had when the call started.");
                    }

                    OutboundMessage.PublishEnd(header, room.Written);
                    break;
                }

                room.Written += read;
                OutboundMessage.PublishProgress(header, room.Written);
            }

            TransferMetrics.Record(new TransferPlan(TransferMode.Pipelined, CachePolicy.Inject), room.Written);
            _completion.TrySetResult();
        }
        catch (Exception ex)
        {
            _completion.TrySetException(ex);
        }
        finally
        {
            FinishWriting(connection, block);
        }
    }

    private static void FinishWriting(RpcConnection connection, ArenaBlock block)
    {
        try
        {
            connection.Arena.FinishWriting(block.Segment.Id, block.Offset);
        }
        catch (InvalidOperationException)
        {
            // The arena closed meanwhile (the connection ended).
        }

        block.Segment.Release();
    }

    /// <summary>
    /// The writer's view of a ring: room left past what the receiver has taken (validated: what it took only
    /// grows and never passes what was written), waited for without a thread when there is none. Room counts
    /// once a whole chunk (<paramref name="minimumRoom"/>) is free: a writer woken for every few KiB the
    /// receiver takes would read its source in slivers, a wait and a read per sliver.
    /// </summary>
    private sealed class RingRoom(RpcConnection connection, nint header, long capacity, long minimumRoom, CancellationToken cancellationToken) : IAsyncWaitCondition
    {
        private long _taken;

        /// <summary>Bytes written so far.</summary>
        public long Written;

        /// <summary>Room to write (&gt; 0), or -1 when the receiver reads no more; throws when the wait is abandoned.</summary>
        public async ValueTask<long> WaitAsync()
        {
            if (IsSatisfied())
            {
                return Free();
            }

            // A receiver that reads on another core frees a chunk every few tens of microseconds: spin for it
            // first, but never on the poller (it serves every connection). A long wait shrinks the next spin.
            var spin = new Spinner(this);
            if (SharedWait.Spin(ref spin, Poller.IsPollerThread ? 0 : connection.PipelineSpin.BudgetTicks) != SharedWait.SpinOutcome.Satisfied)
            {
                long started = Stopwatch.GetTimestamp();
                bool satisfied = await SharedWait.WaitAsync(this, SharedWait.DefaultSleepSliceMilliseconds, cancellationToken).ConfigureAwait(false);
                connection.PipelineSpin.OnBlocked(Stopwatch.GetTimestamp() - started);
                if (!satisfied)
                {
                    connection.ThrowIfClosed();
                    cancellationToken.ThrowIfCancellationRequested();
                    throw new InvalidOperationException("A stream's wait for ring room ended without room, a close or a cancellation.");
                }
            }

            Disarm();
            return Free();
        }

        private unsafe ref PipelineHeader Header => ref *(PipelineHeader*)header;

        private void Disarm() => Volatile.Write(ref Header.SenderWaiting, 0); // nobody sleeps on the word now: spare the receiver its wake syscall

        private long Free() => Volatile.Read(ref Header.ReaderClosed) != 0 ? -1 : capacity - (Written - _taken);

        public bool IsSatisfied()
        {
            long taken = Volatile.Read(ref Header.BytesConsumed);
            if (taken < _taken || taken > Written)
            {
                var violation = new ProtocolViolationException($"Protocol violation by peer process {connection.Peer.ProcessId}: it reported taking {taken} bytes of a streamed argument after {_taken}, of {Written} written.");
                connection.Terminate(violation);
                throw violation;
            }

            _taken = taken;
            return capacity - (Written - taken) >= minimumRoom || Volatile.Read(ref Header.ReaderClosed) != 0;
        }

        public bool IsAbandoned() => connection.IsClosed || cancellationToken.IsCancellationRequested;

        public unsafe void Arm(out int* word, out int expected)
        {
            var progress = (PipelineHeader*)header;
            expected = Volatile.Read(ref progress->ConsumedCount);
            Interlocked.Exchange(ref progress->SenderWaiting, 1);
            word = &progress->ConsumedCount;
        }

        private readonly struct Spinner(RingRoom room) : IWaitCondition
        {
            public bool IsSatisfied() => room.IsSatisfied();

            public bool IsAbandoned() => room.IsAbandoned();
        }
    }

    /// <summary>A window of the mapped block as Memory, for Stream.ReadAsync; valid while the block's segment reference is held.</summary>
    private static unsafe Memory<byte> Window(nint pointer, int length) => new InPlaceMemory((byte*)pointer, length).Memory;
}
