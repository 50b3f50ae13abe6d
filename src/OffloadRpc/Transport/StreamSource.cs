using System.Buffers;
using OffloadRpc.Engines;

namespace OffloadRpc.Transport;

/// <summary>
/// A <see cref="Stream"/> argument sent as it is read: its pipelined block is published empty, then
/// each read lands straight in shared memory and is announced at once, so the caller's reads, the
/// copy and the server's method overlap, with no intermediate buffer. <see cref="Completion"/> tells
/// the caller when the last byte is in (or why it never will be).
/// </summary>
internal sealed class StreamSource
{
    private readonly Stream _stream;
    private readonly CancellationToken _cancellationToken;
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <param name="length">The bytes to send: the rest of a seekable stream, known before the message is built.</param>
    public StreamSource(Stream stream, long length, CancellationToken cancellationToken)
    {
        _stream = stream;
        Length = length;
        _cancellationToken = cancellationToken;
    }

    public long Length { get; }

    /// <summary>Completes when every byte is in the block; fails with the stream's exception (or when it ends early); never started: stays pending.</summary>
    public Task Completion => _completion.Task;

    /// <summary>The message is out: read the stream into the block (on the thread pool; the caller awaits the reply meanwhile).</summary>
    internal void Start(RpcConnection connection, ArenaBlock block, nint header, nint destination) =>
        _ = PumpAsync(connection, block, header, destination);

    /// <summary>The message was never sent: nothing will be read.</summary>
    internal void Abandon(Exception reason) => _completion.TrySetException(reason);

    private async Task PumpAsync(RpcConnection connection, ArenaBlock block, nint header, nint destination)
    {
        await Task.Yield(); // off the sending thread (it may be the caller's, which goes on to await the reply)
        long done = 0;
        try
        {
            long chunk = connection.PipelineChunkBytes;
            while (done < Length)
            {
                int want = (int)Math.Min(chunk, Length - done);
                int read = await _stream.ReadAsync(Window(destination + (nint)done, want), _cancellationToken).ConfigureAwait(false);
                if (read == 0)
                {
                    throw new EndOfStreamException($"The Stream argument ended after {done} of the {Length} bytes it had when the call started.");
                }

                done += read;
                OutboundMessage.PublishProgress(header, done);
            }

            TransferMetrics.Record(new TransferPlan(TransferMode.Pipelined, CachePolicy.Inject), Length);
            _completion.TrySetResult();
        }
        catch (Exception ex)
        {
            _completion.TrySetException(ex);
        }
        finally
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
    }

    /// <summary>A window of the mapped block as Memory, for Stream.ReadAsync; valid while the block's segment reference is held.</summary>
    private static unsafe Memory<byte> Window(nint pointer, int length) => new InPlaceMemory((byte*)pointer, length).Memory;
}
