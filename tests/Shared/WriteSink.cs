namespace OffloadRpc.Testing;

/// <summary>
/// A write-only stream that hands each write to <see cref="Consume"/>, noting whether its memory was handed
/// over in place (a <see cref="ReadOnlyMemory{T}"/> that is no array) or came from an array or a span: the
/// destination of a CopyTo/CopyToAsync whose reads are being watched.
/// </summary>
internal abstract class WriteSink : Stream
{
    public override bool CanRead => false;

    public override bool CanSeek => false;

    public override bool CanWrite => true;

    public override long Length => throw new NotSupportedException();

    public override long Position
    {
        get => throw new NotSupportedException();
        set => throw new NotSupportedException();
    }

    /// <summary>One write; <paramref name="inPlace"/>: its memory was no array (a span cannot tell: false).</summary>
    protected abstract void Consume(ReadOnlySpan<byte> bytes, bool inPlace);

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
    {
        Consume(buffer.Span, !System.Runtime.InteropServices.MemoryMarshal.TryGetArray(buffer, out _));
        return ValueTask.CompletedTask;
    }

    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken)
    {
        Consume(buffer.AsSpan(offset, count), inPlace: false);
        return Task.CompletedTask;
    }

    public override void Write(ReadOnlySpan<byte> buffer) => Consume(buffer, inPlace: false);

    public override void Write(byte[] buffer, int offset, int count) => Consume(buffer.AsSpan(offset, count), inPlace: false);

    public override void Flush()
    {
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();
}
