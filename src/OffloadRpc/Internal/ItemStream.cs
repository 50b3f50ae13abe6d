using MessagePack;
using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>A client's streamed argument: its items, and how each is encoded. Sent by <see cref="PumpAsync"/> once the request is out.</summary>
internal abstract class ItemStream
{
    /// <summary>
    /// Sends every item within the server's credit, then the end; an exception of the caller's enumerable
    /// is sent as the stream's fault and rethrown. Stops (with <see cref="OperationCanceledException"/>)
    /// when <paramref name="cancellationToken"/> fires: the call was answered or cancelled.
    /// </summary>
    /// <param name="options">Read at the first item only: a stream of buffers never builds MessagePack's options (NativeAOT stays free of their dynamic-code paths).</param>
    public abstract Task PumpAsync(StreamOutbox outbox, SerializerOptionsSource options, CancellationToken cancellationToken);

    /// <summary>
    /// Sends the items while the reply (<paramref name="pending"/>, whose call feeds <paramref name="outbox"/>
    /// its credit) is awaited; the reply (the server's method returned) stops the items still to come. The
    /// caller's own exception (its enumerable threw) wins over the fault it caused on the server. Every
    /// transport calls with a streamed argument this way.
    /// </summary>
    public async ValueTask<RpcReply> SendWhileAwaitingAsync(ValueTask<RpcReply> pending, StreamOutbox outbox, SerializerOptionsSource options, CancellationToken cancellationToken)
    {
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        Task pump = PumpAsync(outbox, options, stop.Token);
        RpcReply reply;
        try
        {
            reply = await pending.ConfigureAwait(false);
        }
        catch
        {
            stop.Cancel();
            if (await FailureOf(pump).ConfigureAwait(false) is { } own)
            {
                System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(own);
            }

            throw;
        }

        stop.Cancel();
        if (await FailureOf(pump).ConfigureAwait(false) is { } failure)
        {
            reply.Dispose();
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(failure);
        }

        return reply;
    }

    /// <summary>How a pump ended: null when it finished or was stopped, the caller's exception when its enumerable threw.</summary>
    public static async Task<Exception?> FailureOf(Task pump)
    {
        try
        {
            await pump.ConfigureAwait(false);
            return null;
        }
        catch (OperationCanceledException)
        {
            return null;
        }
        catch (Exception ex) when (ex is not (OffloadRpcException or ObjectDisposedException))
        {
            return ex; // the caller's enumerable threw
        }
        catch
        {
            return null; // the connection's failure: the reply tells it
        }
    }
}

internal sealed class ItemStream<T>(IAsyncEnumerable<T> items, StreamItemEncoder<T> encode) : ItemStream
{
    public override async Task PumpAsync(StreamOutbox outbox, SerializerOptionsSource options, CancellationToken cancellationToken)
    {
        await Task.Yield(); // the caller goes on to await the reply; items go out from the thread pool
        IAsyncEnumerator<T> enumerator = items.GetAsyncEnumerator(cancellationToken);
        try
        {
            while (true)
            {
                await outbox.WaitAsync(cancellationToken).ConfigureAwait(false);
                bool more;
                try
                {
                    more = await enumerator.MoveNextAsync().ConfigureAwait(false);
                }
                catch (Exception ex) when (!cancellationToken.IsCancellationRequested)
                {
                    outbox.Fail(ex); // the server's method sees it from its MoveNextAsync
                    throw;
                }

                if (!more)
                {
                    break;
                }

                if (Poller.IsPollerThread)
                {
                    await Task.Yield(); // sending may wait for ring or arena space: never on the poller
                }

                MessageBuilder item;
                try
                {
                    item = encode(enumerator.Current, options.Options);
                    if (item.HasDeferredPayloads)
                    {
                        item.Discard();
                        throw new InvalidOperationException("A stream item cannot carry a stream or an async enumerable.");
                    }
                }
                catch (Exception ex) when (!cancellationToken.IsCancellationRequested)
                {
                    FailQuietly(outbox, ex); // an item that cannot be encoded fails the stream as a throwing enumerable does
                    throw;
                }

                try
                {
                    outbox.SendItem(item.WrittenBody, item.Payloads, cancellationToken);
                }
                catch (Exception ex)
                {
                    foreach (OutboundPayload payload in item.Payloads)
                    {
                        payload.Lease?.Dispose(); // the caller gave the item's leases up by yielding them
                    }

                    if (!cancellationToken.IsCancellationRequested)
                    {
                        FailQuietly(outbox, ex); // no room for the item, say: the server stops waiting for it
                    }

                    throw;
                }
                finally
                {
                    item.Return();
                }
            }

            outbox.End();
        }
        finally
        {
            await enumerator.DisposeAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Tells the server the stream failed with <paramref name="failure"/>, as a throwing enumerable does, so that
    /// neither side waits for an item that will not come (the caller's call then ends with the server's answer,
    /// and the caller gets <paramref name="failure"/> itself); a connection too broken to tell is left to end the call.
    /// </summary>
    private static void FailQuietly(StreamOutbox outbox, Exception failure)
    {
        try
        {
            outbox.Fail(failure);
        }
        catch (Exception ex) when (ex is OffloadRpcException or ObjectDisposedException or OperationCanceledException or InvalidOperationException)
        {
        }
    }
}
