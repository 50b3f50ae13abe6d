using OffloadRpc;

namespace ImagePipeline;

/// <summary>The worker process's implementation: runs the fast kernels on the request's memory in place (shared memory; over gRPC, the received copy).</summary>
internal sealed class ImageWorker : IImageWorker
{
    /// <summary><paramref name="rgbFrame"/> points into shared memory (over gRPC, into the received request) and is valid until this method returns.</summary>
    public ValueTask<HistogramResult> HistogramAsync(ReadOnlyMemory<byte> rgbFrame, int width, int height, CancellationToken ct = default) =>
        ValueTask.FromResult(Kernels.Histogram(rgbFrame.Span, width, height));

    public ValueTask<ChannelStats> NormalizeStatsAsync(ReadOnlyMemory<float> batch, int images, int channels, int height, int width, CancellationToken ct = default) =>
        ValueTask.FromResult(Kernels.NormalizeStats(batch.Span, images, channels, height, width));

    /// <summary>The frame is ours now (dispose gives it back); the thumbnail is rented from the calling connection and returned without a copy.</summary>
    public ValueTask<SharedBuffer> ThumbnailAsync(SharedBuffer rgbFrame, int width, int height, CancellationToken ct = default)
    {
        using (rgbFrame)
        {
            Kernels.CheckFrame(rgbFrame.Length, width, height); // before renting: a bad call costs no shared memory
            Kernels.CheckThumbnail(Kernels.ThumbnailBytes(width, height), width, height);
            SharedBuffer thumbnail = OffloadCallContext.Current!.Rent(Kernels.ThumbnailBytes(width, height));
            try
            {
                Kernels.Thumbnail(rgbFrame.Span, width, height, thumbnail.Span);
            }
            catch
            {
                thumbnail.Dispose();
                throw;
            }

            return ValueTask.FromResult(thumbnail);
        }
    }

    /// <summary>Each frame is rendered in place into shared memory rented from the calling connection and moves to the client: no copy.</summary>
    public async IAsyncEnumerable<SharedBuffer> RenderStreamAsync(int count, int width, int height, int firstFrame, [System.Runtime.CompilerServices.EnumeratorCancellation] CancellationToken ct = default)
    {
        long needed = (long)width * height * 3;
        if (width <= 0 || height <= 0 || needed > int.MaxValue)
        {
            throw new ArgumentException($"A {width}x{height} RGB frame cannot be rendered into one buffer.");
        }

        int bytes = (int)needed;
        OffloadCallContext context = OffloadCallContext.Current!;
        for (int i = 0; i < count; i++)
        {
            ct.ThrowIfCancellationRequested();
            SharedBuffer frame = context.Rent(bytes);
            try
            {
                Kernels.Render(frame.Span, width, height, firstFrame + i);
            }
            catch
            {
                frame.Dispose();
                throw;
            }

            yield return frame;
        }

        await Task.CompletedTask;
    }

    public ValueTask<int> PingAsync(int value) => ValueTask.FromResult(value + 1);
}
