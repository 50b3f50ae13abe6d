using OffloadRpc.Transport;

namespace OffloadRpc.Internal;

/// <summary>
/// A streamed argument as the server's method sees it: an <see cref="IAsyncEnumerable{T}"/> over the
/// items the client sends. Taking the next item gives the previous one back and returns credit to the
/// client. Enumerated once.
/// </summary>
internal sealed class ArgumentStream<T> : IAsyncEnumerable<T>, IAsyncEnumerator<T>
{
    private readonly StreamInbox _inbox;
    private readonly ReplyDecoder<T> _decoder;
    private readonly SerializerOptionsSource _options;
    private readonly CancellationToken _callToken;
    private CancellationTokenRegistration _callRegistration;
    private CancellationTokenRegistration _enumeratorRegistration;
    private StreamItemMessage? _item;
    private T _current = default!;
    private int _enumerated;
    private bool _finished;

    public ArgumentStream(StreamInbox inbox, ReplyDecoder<T> decoder, SerializerOptionsSource options, CancellationToken callToken)
    {
        _inbox = inbox;
        _decoder = decoder;
        _options = options;
        _callToken = callToken;
    }

    public T Current => _current;

    public IAsyncEnumerator<T> GetAsyncEnumerator(CancellationToken cancellationToken = default)
    {
        if (Interlocked.Exchange(ref _enumerated, 1) != 0)
        {
            throw new InvalidOperationException("A streamed argument is enumerated once.");
        }

        // The call's cancellation (the client cancelled or died) and the enumerator's own end the stream at once.
        _callRegistration = _callToken.UnsafeRegister(static (state, token) => ((StreamInbox)state!).Complete(new OperationCanceledException(token), discardQueued: true), _inbox);
        if (cancellationToken.CanBeCanceled && cancellationToken != _callToken)
        {
            _enumeratorRegistration = cancellationToken.UnsafeRegister(static (state, token) => ((StreamInbox)state!).Complete(new OperationCanceledException(token), discardQueued: true), _inbox);
        }

        return this;
    }

    public ValueTask<bool> MoveNextAsync()
    {
        if (_item is { } previous)
        {
            _item = null;
            _current = default!;
            _inbox.Consumed(previous);
        }

        if (_finished)
        {
            return new ValueTask<bool>(false);
        }

        ValueTask<StreamItemMessage?> next = _inbox.ReadAsync();
        return next.IsCompletedSuccessfully ? new ValueTask<bool>(Take(next.Result)) : ReadAsync(next);
    }

    private async ValueTask<bool> ReadAsync(ValueTask<StreamItemMessage?> next) => Take(await next.ConfigureAwait(false));

    private bool Take(StreamItemMessage? item)
    {
        if (item is null)
        {
            _finished = true;
            return false;
        }

        _item = item;
        try
        {
            _current = _decoder(new CallReply(new RpcReply(item, item.Version), _options));
        }
        catch (Exception ex) when (ex is not (ObjectDisposedException or OperationCanceledException or OutOfMemoryException))
        {
            var violation = ex as ProtocolViolationException ?? new ProtocolViolationException("A stream item does not decode: " + ex.Message, ex);
            item.AbortConnection(violation);
            throw violation;
        }

        return true;
    }

    public ValueTask DisposeAsync()
    {
        if (_item is { } previous)
        {
            _item = null;
            _current = default!;
            _inbox.Consumed(previous);
        }

        if (!_finished)
        {
            _finished = true;
            _inbox.Close(); // left early: what is queued or still comes goes back at once
        }

        _callRegistration.Dispose();
        _enumeratorRegistration.Dispose();
        return ValueTask.CompletedTask;
    }
}
