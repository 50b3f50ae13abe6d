namespace OffloadRpc.Testing;

/// <summary>
/// A stream that cannot seek, as a pipe that went quiet: its first reads return <c>count</c> bytes in
/// all, the next one waits until it is cancelled (and notes that it was).
/// </summary>
internal sealed class QuietStream(int count) : Stream
{
    private int _left = count;

    /// <summary>The read that waited was cancelled.</summary>
    public bool ReadCancelled { get; private set; }

    public override bool CanRead => true;

    public override bool CanSeek => false;

    public override bool CanWrite => false;

    public override long Length => throw new NotSupportedException();

    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_left > 0)
        {
            int n = Math.Min(_left, buffer.Length);
            buffer.Span[..n].Fill(0x5A);
            _left -= n;
            return n;
        }

        try
        {
            await Task.Delay(Timeout.Infinite, cancellationToken);
        }
        catch (OperationCanceledException)
        {
            ReadCancelled = true;
            throw;
        }

        return 0;
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException("read asynchronously");

    public override void Flush()
    {
    }

    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}
